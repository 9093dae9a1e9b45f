"""Bus and gRPC edge of the export service."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import asyncpg
import grpc
from prometheus_client import Counter, Histogram

from services.common.auth import IdentityView, require_project
from services.common.bus.worker import Delivery
from services.common.errors import PermanentError
from services.common.grpc_context import Context
from services.export import formats, repo
from services.export.service import RawLabel, expiry_cutoff, person_of
from services.export.settings import ExportSettings
from services.export.split import SplitSpec, assign
from services.gen.tandem.export.v1 import export_pb2, export_pb2_grpc
from services.gen.tandem.items.v1 import items_pb2
from services.gen.tandem.labels.v1 import labels_pb2
from services.gen.tandem.stats.v1 import stats_pb2, stats_pb2_grpc

log = logging.getLogger(__name__)

EXPIRED = Counter(
    "tandem_export_snapshots_expired_total", "Export snapshots deleted for being past retention."
)
ROWS = Counter("tandem_export_rows_total", "Rows written to exports.")
SECONDS = Histogram("tandem_export_seconds", "Time to create an export snapshot.")
FINALIZED = Counter("tandem_export_final_labels_total", "Final labels received, by source.", ["source"])
RAW = Counter(
    "tandem_export_raw_labels_total",
    "Human labels received: a person's own (kept) or not (an aggregate, or without annotator).",
    ["kind"],
)


class Materializer:
    """Keeps copies of items, people's own labels and the strongest final label of each, from
    the bus."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def on_items(self, delivery: Delivery) -> None:
        batch = delivery.message
        assert isinstance(batch, items_pb2.ItemBatch)
        async with self._pool.acquire() as conn:
            await repo.upsert_items(conn, batch.items)

    async def on_final_labels(self, delivery: Delivery) -> None:
        batch = delivery.message
        assert isinstance(batch, labels_pb2.FinalLabelBatch)
        if not batch.labels:
            return
        try:
            async with self._pool.acquire() as conn:
                await repo.upsert_final_labels(conn, batch.project_id, batch.labels)
        except ValueError as exc:
            raise PermanentError(str(exc)) from exc
        for lb in batch.labels:
            FINALIZED.labels(labels_pb2.LabelSource.Name(lb.source)).inc()

    async def on_human_labels(self, delivery: Delivery) -> None:
        batch = delivery.message
        assert isinstance(batch, labels_pb2.HumanLabelBatch)
        raw = _raw_labels(batch)
        if not raw:
            return
        try:
            async with self._pool.acquire() as conn:
                await repo.insert_raw_labels(conn, raw)
        except ValueError as exc:  # asyncpg's DataError: an item id that is not a UUID
            raise PermanentError(str(exc)) from exc


def _raw_labels(batch: labels_pb2.HumanLabelBatch) -> list[RawLabel]:
    out: list[RawLabel] = []
    for lb in batch.labels:
        person = person_of(lb.pending, lb.annotator_id, lb.annotator_ids)
        if person is None:
            RAW.labels("aggregate" if not lb.pending and len(lb.annotator_ids) > 1 else "anonymous").inc()
            continue
        RAW.labels("person").inc()
        out.append(
            RawLabel(
                item_id=lb.item_id,
                project_id=batch.project_id,
                task_id=lb.task_id,
                annotator_id=person,
                pool_id=lb.pool_id,
                label=lb.label,
                reason=lb.reason,
                seconds_spent=lb.seconds_spent,
                labeled_at=datetime.fromtimestamp(lb.labeled_unix_ms / 1000, tz=UTC),
                model_label=lb.suggested_label,
                model_confidence=lb.suggested_confidence,
            )
        )
    return out


FORMAT_NAMES = {
    export_pb2.EXPORT_FORMAT_UNSPECIFIED: formats.JSONL,
    export_pb2.EXPORT_FORMAT_JSONL: formats.JSONL,
    export_pb2.EXPORT_FORMAT_CSV: formats.CSV,
    export_pb2.EXPORT_FORMAT_PARQUET: formats.PARQUET,
    export_pb2.EXPORT_FORMAT_LABEL_STUDIO: formats.LABEL_STUDIO,
}
FORMAT_ENUMS = {
    name: enum for enum, name in FORMAT_NAMES.items() if enum != export_pb2.EXPORT_FORMAT_UNSPECIFIED
}
# gRPC refuses messages over 4 MiB by default; a Parquet row group can be bigger.
MAX_CHUNK_BYTES = 1 << 20


def _info(row: asyncpg.Record) -> export_pb2.ExportInfo:
    return export_pb2.ExportInfo(
        export_id=str(row["export_id"]),
        project_id=row["project_id"],
        rows=row["rows"],
        pending=row["pending"],
        rows_by_source=json.loads(row["rows_by_source"]),
        created_unix_ms=int(row["created_at"].timestamp() * 1000),
        format=FORMAT_ENUMS[row["format"]],
        rows_by_split=json.loads(row["rows_by_split"]),
    )


def _split_spec(request: export_pb2.CreateExportRequest) -> SplitSpec | None:
    if not request.HasField("split"):
        return None
    sp = request.split
    fractions = {"train": sp.train, "validation": sp.validation, "test": sp.test}
    return SplitSpec({n: f for n, f in fractions.items() if f > 0}, seed=sp.seed)


def _encoder(row: asyncpg.Record, stem: str) -> formats.Encoder:
    fmt = row["format"]
    splits = list(json.loads(row["rows_by_split"]))
    if fmt == formats.CSV:
        return formats.CsvEncoder(stem + formats.SUFFIXES[fmt], with_split=bool(splits))
    if fmt == formats.LABEL_STUDIO:
        return formats.LabelStudioEncoder(stem + formats.SUFFIXES[fmt])
    if fmt == formats.PARQUET:
        # Split names in their usual order, the order the card lists them in.
        ordered = [n for n in ("train", "validation", "test") if n in splits]
        return formats.ParquetEncoder(stem, ordered, row["project_id"], json.loads(row["rows_by_source"]))
    raise ValueError(f"no encoder for format {fmt!r}")


def _encode(encoder: formats.Encoder, lines: list[str]) -> list[formats.Piece]:
    if isinstance(encoder, formats.ParquetEncoder):
        # Lines streamed with metadata as text (see _stream_encoded): Arrow parses them itself.
        return encoder.encode_jsonl(("\n".join(lines) + "\n").encode())
    return encoder.encode([json.loads(line) for line in lines])


def _chunks(pieces: list[formats.Piece], rows: int) -> Iterator[export_pb2.ExportChunk]:
    """The pieces cut to messages gRPC accepts; the batch's row count rides on the first."""
    for piece in pieces:
        for start in range(0, max(len(piece.data), 1), MAX_CHUNK_BYTES):
            yield export_pb2.ExportChunk(
                data=piece.data[start : start + MAX_CHUNK_BYTES], file=piece.file, rows=rows
            )
            rows = 0


class ExportServicer(export_pb2_grpc.ExportServiceServicer):
    def __init__(self, pool: asyncpg.Pool, settings: ExportSettings, view: IdentityView) -> None:
        self._pool = pool
        self._settings = settings
        self._view = view

    async def CreateExport(
        self, request: export_pb2.CreateExportRequest, context: Context
    ) -> export_pb2.ExportInfo:
        if not request.project_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "project_id is required")
        fmt = FORMAT_NAMES.get(request.format)
        if fmt is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown export format {request.format}")
        assert fmt is not None
        try:
            spec = _split_spec(request)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        with SECONDS.time():
            async with self._pool.acquire() as conn, conn.transaction():
                row = await repo.create_snapshot(conn, request.project_id, fmt)
                if spec is not None:
                    items = await repo.split_inputs(conn, row["export_id"])
                    # CPU-bound over every row: off the event loop, so other calls are served.
                    splits = await asyncio.to_thread(assign, items, spec)
                    row = await repo.set_splits(conn, row["export_id"], splits)
        ROWS.inc(row["rows"])
        return _info(row)

    async def GetExport(
        self, request: export_pb2.GetExportRequest, context: Context
    ) -> export_pb2.ExportInfo:
        row = await self._find(request.export_id, context)
        return _info(row)

    async def StreamExport(
        self, request: export_pb2.StreamExportRequest, context: Context
    ) -> AsyncIterator[export_pb2.ExportChunk]:
        row = await self._find(request.export_id, context)
        chunks = (
            self._stream_jsonl(request.export_id)
            if row["format"] == formats.JSONL
            else self._stream_encoded(row, request.file_stem or "data")
        )
        digests: dict[str, hashlib._Hash] = {}
        async for chunk in chunks:
            digests.setdefault(chunk.file, hashlib.sha256()).update(chunk.jsonl or chunk.data)
            yield chunk
        for file, digest in digests.items():
            yield export_pb2.ExportChunk(file=file, sha256=digest.hexdigest())

    async def _stream_jsonl(self, export_id: str) -> AsyncIterator[export_pb2.ExportChunk]:
        lines: list[str] = []
        async with self._pool.acquire() as conn:
            async for line in repo.stream_lines(conn, export_id, self._settings.chunk_lines):
                lines.append(line)
                if len(lines) >= self._settings.chunk_lines:
                    yield export_pb2.ExportChunk(jsonl=("\n".join(lines) + "\n").encode())
                    lines = []
        if lines:
            yield export_pb2.ExportChunk(jsonl=("\n".join(lines) + "\n").encode())

    async def _stream_encoded(self, row: asyncpg.Record, stem: str) -> AsyncIterator[export_pb2.ExportChunk]:
        encoder = _encoder(row, stem)
        # Parquet writes a row group per batch: too small a group makes a slow, large file.
        batch_rows = (
            self._settings.row_group_rows if row["format"] == formats.PARQUET else self._settings.chunk_lines
        )
        lines: list[str] = []
        async with self._pool.acquire() as conn:
            async for line in repo.stream_lines(
                conn,
                str(row["export_id"]),
                self._settings.chunk_lines,
                metadata_as_text=isinstance(encoder, formats.ParquetEncoder),
            ):
                lines.append(line)
                if len(lines) >= batch_rows:
                    # Decoding and encoding are CPU-bound: off the event loop.
                    for chunk in _chunks(await asyncio.to_thread(_encode, encoder, lines), len(lines)):
                        yield chunk
                    lines = []
        pieces = await asyncio.to_thread(_encode, encoder, lines) if lines else []
        pieces += await asyncio.to_thread(encoder.finish)
        for chunk in _chunks(pieces, len(lines)):
            yield chunk

    async def _find(self, export_id: str, context: Context) -> asyncpg.Record:
        try:
            uuid.UUID(export_id)
        except ValueError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{export_id!r} is not an export id")
        async with self._pool.acquire() as conn:
            row = await repo.get_export(conn, export_id)
        if row is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no export {export_id}")
        assert row is not None
        await require_project(context, row["project_id"], self._view)
        return row


class RetentionSweeper:
    """Deletes snapshots past the retention: each is a full copy of its project's rows."""

    def __init__(self, pool: asyncpg.Pool, settings: ExportSettings) -> None:
        self._pool = pool
        self._settings = settings

    async def sweep(self) -> int:
        cutoff = expiry_cutoff(datetime.now(UTC), self._settings.retention_hours)
        if cutoff is None:
            return 0
        async with self._pool.acquire() as conn:
            deleted = await repo.delete_exports_before(conn, cutoff)
        if deleted:
            EXPIRED.inc(deleted)
            log.info("deleted %d export snapshots created before %s", deleted, cutoff.isoformat())
        return deleted

    async def loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.sweep()
            except (OSError, asyncpg.PostgresError):
                log.warning("export retention sweep failed; retrying", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._settings.sweep_seconds)


class ExportStatsServicer(stats_pb2_grpc.StatsServiceServicer):
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def GetProjectStats(
        self, request: stats_pb2.GetProjectStatsRequest, context: Context
    ) -> stats_pb2.ProjectStats:
        async with self._pool.acquire() as conn:
            items, by_source, last = await repo.stats(conn, request.project_id)
        return stats_pb2.ProjectStats(
            project_id=request.project_id,
            export=stats_pb2.ExportStats(
                items=items,
                finalized=sum(by_source.values()),
                by_source=by_source,
                last_finalized_unix_ms=int(last.timestamp() * 1000) if last else 0,
            ),
        )
