"""Items from an uploaded JSONL or CSV file, read as the bytes arrive and sent on in batches.

Nothing is buffered beyond one batch, so a file of any size costs the app the same memory. Item
text travels as bytes: the ingest service, not the app, judges its encoding and answers per item.
A line the app cannot even parse (bad JSON, a CSV row without the text column) is reported with
its line number next to the service's rejections.
"""

from __future__ import annotations

import csv
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.gen.tandem.ingest.v1 import ingest_pb2

MAX_SHOWN_REJECTIONS = 500
# Gold answers in a file must not reach the people labeling it; the CLI skips them the same way.
SKIPPED_FIELDS = ("label",)


class UploadError(ValueError):
    """The file as a whole cannot be read (too large, no text column); the message says why."""


class ChunkSource(Protocol):
    async def read_chunk(self, size: int = ...) -> bytes: ...


@dataclass
class UploadResult:
    filename: str
    lines: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    # (id or line, reason), the first MAX_SHOWN_REJECTIONS of them.
    rejections: list[tuple[str, str]] = field(default_factory=list)

    def reject(self, where: str, reason: str) -> None:
        self.rejected += 1
        if len(self.rejections) < MAX_SHOWN_REJECTIONS:
            self.rejections.append((where, reason))

    @property
    def truncated(self) -> bool:
        return self.rejected > len(self.rejections)


async def lines(source: ChunkSource, max_bytes: int, chunk: int = 1 << 16) -> AsyncIterator[str]:
    """Physical lines of the upload. Undecodable bytes survive as surrogates and are restored to
    the same bytes before they leave, so the service sees exactly what was uploaded."""
    seen, pending = 0, b""
    while True:
        data = await source.read_chunk(chunk)
        if not data:
            break
        seen += len(data)
        if seen > max_bytes:
            raise UploadError(f"the file is larger than {max_bytes >> 20} MiB; use `tandem ingest` for it")
        pending += data
        *complete, pending = pending.split(b"\n")
        for raw in complete:
            yield raw.decode("utf-8", "surrogateescape")
    if pending:
        yield pending.decode("utf-8", "surrogateescape")


def _bytes(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a \ud800 written as a JSON escape: pass it on for the service to judge
        return text.encode("utf-8", "surrogatepass")


def _metadata(row: dict[str, Any], skip: set[str]) -> dict[str, str]:
    return {
        str(k): str(v)
        for k, v in row.items()
        if k not in skip and k is not None and isinstance(v, str | int | float | bool)
    }


Row = tuple[int, dict[str, Any] | None, str]  # line number, the row or None, the error when None


async def jsonl_rows(source: AsyncIterator[str]) -> AsyncIterator[Row]:
    lineno = 0
    async for line in source:
        lineno += 1
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            yield lineno, None, f"not valid JSON: {exc.args[0] if exc.args else exc}"
            continue
        if isinstance(row, dict):
            yield lineno, row, ""
        else:
            yield lineno, None, "each line must be a JSON object"


async def csv_rows(source: AsyncIterator[str]) -> AsyncIterator[Row]:
    """CSV records, a quoted field may span lines: physical lines are joined until the quotes
    balance (RFC 4180 escapes a quote as two, so an odd count means the field goes on)."""
    header: list[str] | None = None
    record, start, lineno = "", 0, 0
    async for line in source:
        lineno += 1
        if not record:
            start = lineno
        record = f"{record}\n{line}" if record else line
        if record.count('"') % 2:
            continue
        text, record = record.rstrip("\r"), ""
        if not text.strip():
            continue
        fields = next(csv.reader([text]))
        if header is None:
            header = fields
            continue
        yield start, dict(zip(header, fields, strict=False)), ""
    if record:
        yield start, None, "a quoted field is never closed"


async def ingest_file(
    source: ChunkSource,
    *,
    filename: str,
    project_id: str,
    submit: Callable[[ingest_pb2.SubmitBatchRequest], Awaitable[ingest_pb2.SubmitBatchResponse]],
    batch_items: int,
    max_bytes: int,
    id_field: str = "id",
    text_field: str = "text",
) -> UploadResult:
    result = UploadResult(filename)
    is_csv = filename.lower().endswith(".csv")
    text = lines(source, max_bytes)
    rows = csv_rows(text) if is_csv else jsonl_rows(text)
    skip = {id_field, text_field, *SKIPPED_FIELDS}
    batch: list[ingest_pb2.RawItem] = []

    async def flush() -> None:
        if not batch:
            return
        response = await submit(ingest_pb2.SubmitBatchRequest(project_id=project_id, items=batch))
        result.accepted += response.accepted
        result.duplicates += response.duplicates
        for item in response.results:
            if item.outcome == ingest_pb2.ITEM_OUTCOME_REJECTED:
                result.reject(item.external_id, item.reason)
        batch.clear()

    async for lineno, row, error in rows:
        result.lines += 1
        if row is None:
            result.reject(f"line {lineno}", error)
            continue
        if text_field not in row:
            if is_csv:
                raise UploadError(f"the CSV file has no {text_field!r} column")
            result.reject(f"line {lineno}", f"no {text_field!r} field")
            continue
        value = row[text_field]
        batch.append(
            ingest_pb2.RawItem(
                external_id=str(row.get(id_field) or f"{filename}:{lineno}"),
                text=b"" if value is None else _bytes(str(value)),
                metadata=_metadata(row, skip),
            )
        )
        if len(batch) >= batch_items:
            await flush()
    await flush()
    return result
