"""Export formats read back by the library that consumes each, and the leak-free split."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest

from services.cli.commands import export_files
from services.export import formats
from services.export.service import expiry_cutoff
from services.export.split import SplitSpec, assign, group_key, normalize
from services.gen.tandem.export.v1 import export_pb2
from services.gen.tandem.stats.v1 import stats_pb2


def _row(n: int, text: str, label: str, raw: list[tuple[str, str]], **extra: Any) -> dict[str, Any]:
    """A snapshot line as create_snapshot builds it (timestamps as PostgreSQL's jsonb writes them)."""
    return {
        "id": f"ext-{n}",
        "item_id": f"00000000-0000-0000-0000-{n:012d}",
        "text": text,
        "label": label,
        "source": "consensus" if len(raw) > 1 else "human" if raw else "auto",
        "confidence": 0.75,
        "posterior": 0.75,
        "aggregation": "dawid_skene" if len(raw) > 1 else "single",
        "raw_labels": [
            {
                "annotator_id": who,
                "pool_id": "north",
                "label": lb,
                "labeled_at": f"2026-11-30T10:00:0{i}.25+00:00",
                "reason": "uncertain",
            }
            for i, (who, lb) in enumerate(raw)
        ],
        "model_version": "m-1",
        "annotator_ids": [who for who, _ in raw],
        "below_target": False,
        "synthetic": n % 2 == 0,
        "metadata": {"lang": "en", "region": "eu"} if n % 2 else {},
        "ingested_at": "2026-11-30T09:00:00+00:00",
        "finalized_at": "2026-11-30T10:00:05.123456+00:00",
        **extra,
    }


ROWS = [
    _row(1, "Plain text", "sport", [("ann-a", "sport"), ("ann-b", "tech")]),
    _row(2, 'Commas, "quotes"\nand a newline', "tech", [("ann-c", "tech")]),
    _row(3, "Ünïcode — ✓", "business", []),
    _row(4, "", "sport", [("ann-a", "sport")]),
]


def _raw(row: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(r["annotator_id"], r["pool_id"], r["label"]) for r in row["raw_labels"]]


def test_csv_reads_back_one_row_per_item_with_raw_labels() -> None:
    data = formats.to_csv(ROWS)
    read = list(csv.DictReader(io.StringIO(data.decode(), newline="")))
    assert [r["item_id"] for r in read] == [r["item_id"] for r in ROWS]
    for got, want in zip(read, ROWS, strict=True):
        assert got["text"] == want["text"]
        assert got["label"] == want["label"]
        assert json.loads(got["raw_labels"]) == want["raw_labels"]
        assert json.loads(got["metadata"]) == want["metadata"]
        assert json.loads(got["annotator_ids"]) == want["annotator_ids"]
        assert float(got["confidence"]) == want["confidence"]
        assert json.loads(got["synthetic"]) is want["synthetic"]
    assert "split" not in read[0]


def test_csv_of_nothing_is_a_header() -> None:
    assert list(csv.reader(io.StringIO(formats.to_csv([]).decode()))) == [list(formats.CSV_COLUMNS)]


def test_parquet_reads_back_with_pyarrow_and_pandas() -> None:
    files, card = formats.to_parquet(ROWS, project_id="news")
    assert list(files) == ["data.parquet"]
    table = pq.read_table(io.BytesIO(files["data.parquet"]))
    got = table.to_pylist()
    assert [r["item_id"] for r in got] == [r["item_id"] for r in ROWS]
    for g, want in zip(got, ROWS, strict=True):
        assert g["text"] == want["text"]
        assert _raw(g) == _raw(want)
        assert [r["labeled_at"] for r in g["raw_labels"]] == [
            datetime.fromisoformat(r["labeled_at"]) for r in want["raw_labels"]
        ]
        assert json.loads(g["metadata"]) == want["metadata"]
        assert g["finalized_at"] == datetime.fromisoformat(want["finalized_at"])
    frame = table.to_pandas()
    assert list(frame["label"]) == [r["label"] for r in ROWS]
    assert [len(v) for v in frame["raw_labels"]] == [len(r["raw_labels"]) for r in ROWS]
    assert str(frame["finalized_at"].dtype) == "datetime64[us, UTC]"
    assert card.startswith("---\nconfigs:\n")
    assert "- text-classification" in card
    assert '  - split: "train"\n    path: "data.parquet"' in card
    assert "| sport | 2 |" in card and "| consensus | 1 |" in card


def test_parquet_streamed_in_batches_is_one_valid_file() -> None:
    encoder = formats.ParquetEncoder("out", [], "news", {})
    pieces = [*encoder.encode(ROWS[:2]), *encoder.encode(ROWS[2:]), *encoder.finish()]
    data = b"".join(p.data for p in pieces if p.file == "out.parquet")
    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    assert (meta.num_rows, meta.num_row_groups) == (4, 2)
    assert [p.file for p in pieces][-1] == formats.CARD_FILE


def test_parquet_with_split_writes_a_file_per_split() -> None:
    rows = [{**r, "split": s} for r, s in zip(ROWS, ("train", "train", "test", "validation"), strict=True)]
    files, card = formats.to_parquet(rows, stem="news", splits=["train", "validation", "test"])
    assert sorted(files) == ["news-test.parquet", "news-train.parquet", "news-validation.parquet"]
    back = {name: pq.read_table(io.BytesIO(data)).to_pylist() for name, data in files.items()}
    assert [r["item_id"] for r in back["news-train.parquet"]] == [ROWS[0]["item_id"], ROWS[1]["item_id"]]
    assert {r["split"] for r in back["news-test.parquet"]} == {"test"}
    assert sum(len(v) for v in back.values()) == len(ROWS)
    assert '  - split: "validation"\n    path: "news-validation.parquet"' in card
    assert '  - name: "train"\n    num_examples: 2' in card


def test_label_studio_tasks_have_the_import_shape() -> None:
    tasks = json.loads(formats.to_label_studio(ROWS))
    assert isinstance(tasks, list) and len(tasks) == len(ROWS)
    for task, row in zip(tasks, ROWS, strict=True):
        assert task["data"]["text"] == row["text"] and task["data"]["id"] == row["id"]
        assert len(task["annotations"]) == len(row["raw_labels"])
        for ann, raw in zip(task["annotations"], row["raw_labels"], strict=True):
            assert ann["completed_by"] == raw["annotator_id"]
            (result,) = ann["result"]
            assert result == {
                "from_name": "label",
                "to_name": "text",
                "type": "choices",
                "value": {"choices": [raw["label"]]},
            }
        (prediction,) = task["predictions"]
        assert prediction["score"] == row["confidence"]
        assert prediction["model_version"] == row["model_version"]
        assert prediction["result"][0]["value"] == {"choices": [row["label"]]}


def test_label_studio_of_nothing_is_an_empty_list() -> None:
    assert json.loads(formats.to_label_studio([])) == []


def test_normalize_and_group_key() -> None:
    assert normalize("  Hello,   WORLD!! ") == "hello world"
    assert normalize("It's\tfine.") == "its fine"
    assert group_key("Order #1234 is late") == group_key("order 98 is LATE.")
    assert group_key("order is late") == group_key("Order 7 is late")
    assert group_key("order is early") != group_key("order is late")


def _corpus(n: int, seed: int = 1) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    labels = ["sport"] * 6 + ["tech"] * 3 + ["rare"]
    items = []
    for i in range(n):
        label = rng.choice(labels)
        # Stories told apart by words: digits do not tell texts apart (near-duplicates).
        word = "".join(chr(97 + int(d)) for d in str(rng.randrange(n // 3)))
        base = f"{label} story {word}"
        # Exact copies, copies differing in case/punctuation/space, and ones differing in digits.
        text = rng.choice([base, base.upper() + "!", f"  {base}  ", f"{base} 42", f"{base} #{i}"])
        items.append((f"id-{i}", text, label))
    return items


def test_split_is_leak_free_and_stratified() -> None:
    items = _corpus(3000)
    spec = SplitSpec({"train": 0.8, "validation": 0.1, "test": 0.1}, seed=7)
    splits = assign(items, spec)
    assert set(splits) == {item_id for item_id, _, _ in items}
    seen: dict[str, str] = {}
    for item_id, text, _ in items:
        for key in (normalize(text), group_key(text)):
            assert seen.setdefault(key, splits[item_id]) == splits[item_id], f"{text!r} leaks"
    whole = Counter(label for _, _, label in items)
    for split, fraction in spec.fractions.items():
        members = [label for item_id, _, label in items if splits[item_id] == split]
        assert len(members) == pytest.approx(fraction * len(items), rel=0.1)
        counts = Counter(members)
        for label, n in whole.items():
            assert counts[label] / len(members) == pytest.approx(n / len(items), abs=0.03)


def test_split_depends_on_the_seed_only() -> None:
    items = _corpus(500)
    spec = SplitSpec({"train": 0.5, "test": 0.5}, seed=3)
    assert assign(items, spec) == assign(list(reversed(items)), spec)
    assert assign(items, spec) != assign(items, SplitSpec({"train": 0.5, "test": 0.5}, seed=4))
    assert set(assign(items, spec).values()) == {"train", "test"}


@pytest.mark.parametrize(
    "fractions",
    [{"train": 0.5, "test": 0.4}, {"train": 1.2, "test": -0.2}, {"holdout": 1.0}],
)
def test_split_spec_refuses_bad_fractions(fractions: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SplitSpec(fractions)


@pytest.mark.parametrize("splits", [(), ("train", "test")])
def test_parquet_from_jsonl_lines_equals_from_dicts(splits: tuple[str, ...]) -> None:
    rows = [{**r, "split": splits[i % 2]} if splits else r for i, r in enumerate(ROWS)]
    # The lines as the service streams them for Parquet: metadata already a JSON string.
    lines = "".join(
        json.dumps({**r, "metadata": json.dumps(r["metadata"], sort_keys=True)}) + "\n" for r in rows
    ).encode()
    fast = formats.ParquetEncoder("d", splits, "news", {})
    pieces = [*fast.encode_jsonl(lines), *fast.finish()]
    got: dict[str, bytearray] = {}
    for p in pieces:
        got.setdefault(p.file, bytearray()).extend(p.data)
    want, card = formats.to_parquet(rows, stem="d", splits=splits, project_id="news", rows_by_source={})
    assert set(got) == {*want, formats.CARD_FILE}
    for name, data in want.items():
        assert pq.read_table(io.BytesIO(bytes(got[name]))).equals(pq.read_table(io.BytesIO(data)))
    assert got[formats.CARD_FILE].decode() == card


class _FakeExport:
    def __init__(self, chunks: list[Any], rows: int) -> None:
        self._chunks, self._rows = chunks, rows

    async def CreateExport(self, request: Any, **call: Any) -> Any:
        return export_pb2.ExportInfo(export_id="e-1", rows=self._rows)

    async def _stream(self) -> Any:
        for c in self._chunks:
            yield c

    def StreamExport(self, request: Any, **call: Any) -> Any:
        assert request.file_stem == "news"
        return self._stream()


class _FakeClients:
    def __init__(self, export: _FakeExport) -> None:
        self.export = export

    async def stats(self, project_id: str) -> Any:
        return stats_pb2.ProjectStats(project_id=project_id)


async def test_cli_writes_a_parquet_file_per_split_and_the_card(tmp_path: Path) -> None:
    rows = [{**r, "split": "train" if i else "test"} for i, r in enumerate(ROWS)]
    encoder = formats.ParquetEncoder("news", ["train", "test"], "news", {})
    pieces = [*encoder.encode(rows), *encoder.finish()]
    chunks = [
        export_pb2.ExportChunk(data=p.data, file=p.file, rows=len(rows) if i == 0 else 0)
        for i, p in enumerate(pieces)
    ]
    sent: dict[str, Any] = {}
    for p in pieces:
        sent.setdefault(p.file, hashlib.sha256()).update(p.data)
    chunks += [export_pb2.ExportChunk(file=f, sha256=d.hexdigest()) for f, d in sent.items()]
    out = tmp_path / "news.parquet"
    _, paths = await export_files(_FakeClients(_FakeExport(chunks, len(rows))), "news", out, "parquet")  # type: ignore[arg-type]
    assert [p.name for p in paths] == ["news-train.parquet", "news-test.parquet", "news.parquet.README.md"]
    assert pq.read_table(paths[0]).num_rows == 3
    assert (tmp_path / "news-train.certificate.json").exists()
    assert "news-test.parquet" in paths[2].read_text()


async def test_cli_refuses_a_file_name_with_a_path(tmp_path: Path) -> None:
    chunks = [export_pb2.ExportChunk(data=b"x", file="../evil.parquet", rows=1)]
    with pytest.raises(RuntimeError, match="unexpected file"):
        await export_files(_FakeClients(_FakeExport(chunks, 1)), "news", tmp_path / "news.parquet", "parquet")  # type: ignore[arg-type]
    assert not (tmp_path.parent / "evil.parquet").exists()


async def test_cli_refuses_a_damaged_file(tmp_path: Path) -> None:
    chunks = [
        export_pb2.ExportChunk(data=b"a,b\n", file="news.csv", rows=1),
        export_pb2.ExportChunk(file="news.csv", sha256=hashlib.sha256(b"a,c\n").hexdigest()),
    ]
    with pytest.raises(RuntimeError, match="damaged"):
        await export_files(_FakeClients(_FakeExport(chunks, 1)), "news", tmp_path / "news.csv", "csv")  # type: ignore[arg-type]


def test_expiry_cutoff() -> None:
    now = datetime(2026, 12, 1, 12, tzinfo=UTC)
    assert expiry_cutoff(now, 24) == now - timedelta(days=1)
    assert expiry_cutoff(now, 0) is None
