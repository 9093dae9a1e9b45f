"""Export formats other than the canonical JSONL: CSV, Parquet (with a dataset card) and Label Studio.

Pure: each encoder takes snapshot rows (the decoded JSONL lines, dicts) in batches and returns the
bytes to append to the files it writes, so the gRPC edge can stream an export of any size with
bounded memory. `to_csv`, `to_parquet` and `to_label_studio` encode a whole list at once.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]
import pyarrow.json as pa_json  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

Row = Mapping[str, Any]

JSONL, CSV, PARQUET, LABEL_STUDIO = "jsonl", "csv", "parquet", "label-studio"
FORMATS = (JSONL, CSV, PARQUET, LABEL_STUDIO)
SUFFIXES = {JSONL: ".jsonl", CSV: ".csv", PARQUET: ".parquet", LABEL_STUDIO: ".json"}
CARD_FILE = "README.md"

# Scalar columns first, nested ones (JSON strings in CSV) last, so a spreadsheet shows the
# text and its label side by side.
CSV_COLUMNS = (
    "id",
    "item_id",
    "text",
    "label",
    "source",
    "confidence",
    "posterior",
    "aggregation",
    "model_version",
    "below_target",
    "synthetic",
    "ingested_at",
    "finalized_at",
    "annotator_ids",
    "metadata",
    "raw_labels",
)
_CSV_JSON = frozenset({"annotator_ids", "metadata", "raw_labels"})

_TS = pa.timestamp("us", tz="UTC")
RAW_LABEL_TYPE = pa.struct(
    [
        ("annotator_id", pa.string()),
        ("pool_id", pa.string()),
        ("label", pa.string()),
        ("labeled_at", _TS),
        ("reason", pa.string()),
        ("model_label", pa.string()),
    ]
)
# metadata is a JSON string, not a map: pandas turns a map column into lists of (key, value)
# tuples and the Hugging Face `datasets` library has no map feature, while a string reads back
# the same everywhere and `json.loads` restores it.
PARQUET_FIELDS = [
    ("id", pa.string()),
    ("item_id", pa.string()),
    ("text", pa.string()),
    ("label", pa.string()),
    ("source", pa.string()),
    ("confidence", pa.float64()),
    ("posterior", pa.float64()),
    ("aggregation", pa.string()),
    ("model_version", pa.string()),
    ("annotator_ids", pa.list_(pa.string())),
    ("below_target", pa.bool_()),
    ("synthetic", pa.bool_()),
    ("metadata", pa.string()),
    ("raw_labels", pa.list_(RAW_LABEL_TYPE)),
    ("ingested_at", _TS),
    ("finalized_at", _TS),
]
# The `datasets` feature spelling of each column, for the card's dataset_info.
_HF_DTYPES = {
    pa.string(): "string",
    pa.float64(): "float64",
    pa.bool_(): "bool",
    _TS: "timestamp[us, tz=UTC]",
}


@dataclass(frozen=True)
class Piece:
    """The next bytes of one output file."""

    file: str
    data: bytes


class Encoder(Protocol):
    def encode(self, rows: Sequence[Row]) -> list[Piece]: ...

    def finish(self) -> list[Piece]: ...


def _ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


class CsvEncoder:
    def __init__(self, file: str, with_split: bool) -> None:
        self._file = file
        self._columns = (*CSV_COLUMNS, "split") if with_split else CSV_COLUMNS
        self._header_written = False

    def encode(self, rows: Sequence[Row]) -> list[Piece]:
        buf = io.StringIO()
        writer = csv.writer(buf)
        if not self._header_written:
            writer.writerow(self._columns)
            self._header_written = True
        for row in rows:
            writer.writerow(
                [
                    json.dumps(row.get(c), ensure_ascii=False) if c in _CSV_JSON else _csv_scalar(row.get(c))
                    for c in self._columns
                ]
            )
        return [Piece(self._file, buf.getvalue().encode())]

    def finish(self) -> list[Piece]:
        return [] if self._header_written else self.encode([])


def _csv_scalar(value: Any) -> Any:
    # Booleans as JSON spells them, so the column reads back the same as in JSONL.
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else value


class LabelStudioEncoder:
    """One JSON array of tasks: each person's label an annotation, the final label a prediction
    (with its confidence as the score), so a reviewer in Label Studio sees both."""

    def __init__(self, file: str) -> None:
        self._file = file
        self._first = True

    def encode(self, rows: Sequence[Row]) -> list[Piece]:
        parts: list[str] = []
        for row in rows:
            parts.append(
                ("[\n" if self._first else ",\n") + json.dumps(label_studio_task(row), ensure_ascii=False)
            )
            self._first = False
        return [Piece(self._file, "".join(parts).encode())] if parts else []

    def finish(self) -> list[Piece]:
        return [Piece(self._file, b"[]\n" if self._first else b"\n]\n")]


def _choice(label: str) -> dict[str, Any]:
    return {"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": [label]}}


def label_studio_task(row: Row) -> dict[str, Any]:
    data: dict[str, Any] = {"text": row["text"], "id": row["id"], "item_id": row["item_id"]}
    meta = {k: row[k] for k in ("source", "aggregation", "metadata", "split") if k in row}
    return {
        "data": data,
        "meta": meta,
        "annotations": [
            {
                "result": [_choice(r["label"])],
                # Label Studio resolves a numeric completed_by to one of its users; ours are
                # Tandem annotator ids, kept as they are so the person stays identifiable.
                "completed_by": r["annotator_id"],
                "created_at": r["labeled_at"],
                "ground_truth": False,
            }
            for r in row.get("raw_labels") or []
        ],
        "predictions": [
            {
                "model_version": row.get("model_version") or row.get("source") or "",
                "score": row.get("confidence"),
                "result": [_choice(row["label"])],
            }
        ],
    }


class _Sink:
    """A write-only file for ParquetWriter whose bytes are taken out as they come.

    tell() counts every byte ever written: the writer records offsets from it in the footer,
    so it must not restart when the buffer is emptied.
    """

    closed = False

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._written = 0

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        self._written += len(data)
        return len(data)

    def tell(self) -> int:
        return self._written

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts = []
        return out


def parquet_schema(with_split: bool) -> pa.Schema:
    return pa.schema(PARQUET_FIELDS + ([("split", pa.string())] if with_split else []))


def _parquet_record(row: Row) -> dict[str, Any]:
    rec = dict(row)
    rec["metadata"] = json.dumps(row.get("metadata") or {}, ensure_ascii=False, sort_keys=True)
    rec["ingested_at"] = _ts(row.get("ingested_at"))
    rec["finalized_at"] = _ts(row.get("finalized_at"))
    rec["raw_labels"] = [{**r, "labeled_at": _ts(r.get("labeled_at"))} for r in row.get("raw_labels") or []]
    return rec


def parquet_file(stem: str, split: str | None) -> str:
    return f"{stem}-{split}.parquet" if split else f"{stem}.parquet"


class ParquetEncoder:
    """One Parquet file per split (or one), a row group per batch, and the dataset card last."""

    def __init__(
        self, stem: str, splits: Sequence[str], project_id: str, rows_by_source: Mapping[str, int]
    ) -> None:
        self._stem = stem
        self._with_split = bool(splits)
        self._schema = parquet_schema(self._with_split)
        self._project_id = project_id
        self._by_source = dict(rows_by_source)
        self._writers: dict[str | None, tuple[_Sink, pq.ParquetWriter]] = {}
        names: list[str | None] = [*splits] or [None]
        for split in names:
            sink = _Sink()
            self._writers[split] = (sink, pq.ParquetWriter(sink, self._schema, compression="zstd"))
        self._labels: Counter[str] = Counter()
        self._split_rows: Counter[str] = Counter()

    def encode(self, rows: Sequence[Row]) -> list[Piece]:
        if not rows:
            return []
        return self._write(pa.Table.from_pylist([_parquet_record(r) for r in rows], schema=self._schema))

    def encode_jsonl(self, data: bytes) -> list[Piece]:
        """The same as `encode`, from snapshot lines whose metadata is already a JSON string:
        parsed by Arrow's JSON reader, without a Python object per value (the fast path for
        large exports; `encode` costs ~50 µs a row, this a few)."""
        if not data:
            return []
        table = pa_json.read_json(
            io.BytesIO(data),
            # One block for the whole batch: a line must never straddle two.
            read_options=pa_json.ReadOptions(block_size=len(data) + 1),
            parse_options=pa_json.ParseOptions(
                explicit_schema=self._schema, unexpected_field_behavior="ignore"
            ),
        )
        return self._write(table.select(self._schema.names))

    def _write(self, table: pa.Table) -> list[Piece]:
        for entry in pc.value_counts(table["label"]).to_pylist():
            self._labels[entry["values"]] += entry["counts"]
        pieces = []
        splits = table["split"] if self._with_split else None
        if splits is not None and (unknown := set(pc.unique(splits).to_pylist()) - set(self._writers)):
            raise ValueError(f"rows with splits {sorted(unknown, key=str)}, not one of {list(self._writers)}")
        for split, (sink, writer) in self._writers.items():
            part = table if splits is None else table.filter(pc.equal(splits, split))
            if part.num_rows == 0:
                continue
            writer.write_table(part)
            self._split_rows[split or "train"] += part.num_rows
            if data := sink.take():
                pieces.append(Piece(parquet_file(self._stem, split), data))
        return pieces

    def finish(self) -> list[Piece]:
        pieces = []
        for split, (sink, writer) in self._writers.items():
            writer.close()
            pieces.append(Piece(parquet_file(self._stem, split), sink.take()))
        card = dataset_card(
            self._project_id,
            self._schema,
            {split or "train": parquet_file(self._stem, split) for split in self._writers},
            {split or "train": self._split_rows[split or "train"] for split in self._writers},
            self._labels,
            self._by_source,
        )
        pieces.append(Piece(CARD_FILE, card.encode()))
        return pieces


def _hf_feature(name: str, typ: pa.DataType, indent: str) -> list[str]:
    head = f"{indent}- name: {name}"
    if pa.types.is_list(typ) and pa.types.is_struct(typ.value_type):
        lines = [head, f"{indent}  list:"]
        for field in typ.value_type:
            lines += _hf_feature(field.name, field.type, indent + "  ")
        return lines
    if pa.types.is_list(typ):
        return [head, f"{indent}  sequence: {_HF_DTYPES[typ.value_type]}"]
    return [head, f"{indent}  dtype: {json.dumps(_HF_DTYPES[typ])}"]


def dataset_card(
    project_id: str,
    schema: pa.Schema,
    files: Mapping[str, str],
    split_rows: Mapping[str, int],
    labels: Mapping[str, int],
    rows_by_source: Mapping[str, int],
) -> str:
    """A Hugging Face dataset card: the YAML header `datasets` and the Hub read (data files per
    split, features, sizes), then a readable summary. Strings are written as JSON, which YAML
    reads as the same strings whatever they contain."""
    q = json.dumps
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split, path in files.items():
        lines += [f"  - split: {q(split)}", f"    path: {q(path)}"]
    lines += ["dataset_info:", "  features:"]
    for field in schema:
        lines += _hf_feature(field.name, field.type, "  ")
    lines += ["  splits:"]
    for split, n in split_rows.items():
        lines += [f"  - name: {q(split)}", f"    num_examples: {n}"]
    lines += ["task_categories:", "- text-classification", "---", ""]
    total = sum(split_rows.values())
    lines += [
        f"# {project_id}",
        "",
        f"Final labels of the Tandem project `{project_id}`: {total} items, with every person's own",
        "label in `raw_labels` and how the final one was reached in `source` and `aggregation`.",
        "`metadata` is a JSON object encoded as a string.",
        "",
        "## Labels",
        "",
        "| label | items |",
        "| --- | ---: |",
    ]
    lines += [f"| {name} | {n} |" for name, n in sorted(labels.items())]
    lines += ["", "## Items by source of the final label", "", "| source | items |", "| --- | ---: |"]
    lines += [f"| {name} | {n} |" for name, n in sorted(rows_by_source.items())]
    lines += ["", "## Splits", "", "| split | file | items |", "| --- | --- | ---: |"]
    lines += [f"| {split} | {files[split]} | {n} |" for split, n in split_rows.items()]
    return "\n".join(lines) + "\n"


def _collect(encoder: Encoder, rows: Iterable[Row]) -> dict[str, bytes]:
    out: dict[str, bytearray] = {}
    for piece in [*encoder.encode(list(rows)), *encoder.finish()]:
        out.setdefault(piece.file, bytearray()).extend(piece.data)
    return {name: bytes(data) for name, data in out.items()}


def to_csv(rows: Sequence[Row], file: str = "data.csv") -> bytes:
    return _collect(CsvEncoder(file, with_split=any("split" in r for r in rows)), rows).get(file, b"")


def to_label_studio(rows: Sequence[Row], file: str = "data.json") -> bytes:
    return _collect(LabelStudioEncoder(file), rows)[file]


def to_parquet(
    rows: Sequence[Row],
    *,
    stem: str = "data",
    splits: Sequence[str] = (),
    project_id: str = "",
    rows_by_source: Mapping[str, int] | None = None,
) -> tuple[dict[str, bytes], str]:
    """The Parquet files by name (one per split, or `<stem>.parquet`) and the dataset card."""
    by_source = rows_by_source if rows_by_source is not None else Counter(r["source"] for r in rows)
    files = _collect(ParquetEncoder(stem, splits, project_id, by_source), rows)
    card = files.pop(CARD_FILE).decode()
    return files, card
