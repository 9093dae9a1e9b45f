"""Bus and gRPC edge of the export service."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import asyncpg
import grpc
from prometheus_client import Counter, Gauge, Histogram

from services.common.auth import IdentityView, require_project
from services.common.bus.worker import Delivery
from services.common.errors import PermanentError, is_transient
from services.common.grpc_context import Context
from services.common.projects import ProjectDirectory
from services.export import formats, repo, service
from services.export.service import ExportFilter, RawLabel, expiry_cutoff, filter_errors, person_of
from services.export.settings import ExportSettings
from services.export.split import SplitSpec, assign
from services.gen.tandem.export.v1 import export_pb2, export_pb2_grpc
from services.gen.tandem.items.v1 import items_pb2
from services.gen.tandem.labels.v1 import labels_pb2
from services.gen.tandem.predictions.v1 import predictions_pb2
from services.gen.tandem.stats.v1 import stats_pb2, stats_pb2_grpc

log = logging.getLogger(__name__)

EXPIRED = Counter(
    "tandem_export_snapshots_expired_total", "Export snapshots deleted for being past retention."
)
ROWS = Counter("tandem_export_rows_total", "Rows written to exports.")
SECONDS = Histogram(
    "tandem_export_seconds",
    "Time an export job takes, from its creation to ready (rows, split and checksum).",
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
)
BUILDING = Gauge("tandem_export_jobs_building", "Export jobs building in this process.")
FINALIZED = Counter("tandem_export_final_labels_total", "Final labels received, by source.", ["source"])
RAW = Counter(
    "tandem_export_raw_labels_total",
    "Human labels received: a person's own (kept) or not (an aggregate, or without annotator).",
    ["kind"],
)


class Materializer:
    """Keeps copies of items, people's own labels and the strongest final label of each, from
    the bus."""

    def __init__(self, pool: asyncpg.Pool, projects: ProjectDirectory) -> None:
        self._pool = pool
        self._projects = projects

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

    async def on_predictions(self, delivery: Delivery) -> None:
        """The labeler's model id, prompt hash and distribution over the project's labels (by
        name: the export must not depend on the label order)."""
        batch = delivery.message
        assert isinstance(batch, predictions_pb2.PredictionBatch)
        if not batch.predictions:
            return
        project = await self._projects.get(batch.project_id)
        names = [lb.name for lb in project.labels]
        rows: list[tuple[str, dict[str, object]]] = []
        for p in batch.predictions:
            if len(p.probs) != len(names):
                raise PermanentError(
                    f"prediction for {p.item_id} does not match the project's {len(names)} labels"
                )
            labeler: dict[str, object] = {
                "model_id": batch.model_id,
                "prompt_hash": batch.prompt_hash,
                "distribution": {n: round(float(x), 6) for n, x in zip(names, p.probs, strict=True)},
            }
            rows.append((p.item_id, labeler))
        at = (
            datetime.fromtimestamp(batch.predicted_unix_ms / 1000, tz=UTC)
            if batch.predicted_unix_ms
            else datetime.now(UTC)
        )
        try:
            async with self._pool.acquire() as conn:
                await repo.upsert_predictions(conn, batch.project_id, rows, at)
        except ValueError as exc:  # an item id that is not a UUID
            raise PermanentError(str(exc)) from exc

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


STATE_ENUMS = {
    service.BUILDING: export_pb2.EXPORT_STATE_BUILDING,
    service.READY: export_pb2.EXPORT_STATE_READY,
    service.FAILED: export_pb2.EXPORT_STATE_FAILED,
}
MAX_LIST = 500
DEFAULT_LIST = 50


def _ms(at: datetime | None) -> int:
    return int(at.timestamp() * 1000) if at is not None else 0


def _filter_pb(f: ExportFilter) -> export_pb2.ExportFilter:
    return export_pb2.ExportFilter(
        sources=f.sources,
        min_confidence=f.min_confidence,
        finalized_after_unix_ms=f.finalized_after_ms,
        finalized_before_unix_ms=f.finalized_before_ms,
        metadata=dict(f.metadata),
        certified_only=f.certified_only,
    )


def _filter_of(pb: export_pb2.ExportFilter) -> ExportFilter:
    return ExportFilter(
        sources=tuple(s.strip().lower() for s in pb.sources),
        min_confidence=pb.min_confidence,
        finalized_after_ms=pb.finalized_after_unix_ms,
        finalized_before_ms=pb.finalized_before_unix_ms,
        metadata=dict(pb.metadata),
        certified_only=pb.certified_only,
    )


def _info(row: asyncpg.Record) -> export_pb2.ExportInfo:
    return export_pb2.ExportInfo(
        export_id=str(row["export_id"]),
        project_id=row["project_id"],
        rows=row["rows"],
        pending=row["pending"],
        rows_by_source=json.loads(row["rows_by_source"]),
        created_unix_ms=_ms(row["created_at"]),
        format=FORMAT_ENUMS[row["format"]],
        rows_by_split=json.loads(row["rows_by_split"]),
        state=STATE_ENUMS[row["state"]],
        rows_total=row["rows_total"],
        rows_done=row["rows_done"],
        version=row["version"],
        checksum=row["checksum"],
        error=row["error"],
        expires_unix_ms=_ms(row["expires_at"]),
        filter=_filter_pb(ExportFilter.from_json(json.loads(row["filter"]))),
        ready_unix_ms=_ms(row["ready_at"]),
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


class ExportFailed(Exception):
    """A snapshot job failed; the message is its stored error."""


class ExportServicer(export_pb2_grpc.ExportServiceServicer):
    """Exports as jobs: CreateExport commits the export (state building) and returns; a task of
    this process copies the rows page by page, then writes the split and the checksum.

    A job holds one pooled connection from start to end, in one REPEATABLE READ transaction: the
    count CreateExport answers and every page read the same labels, so rows_total is exactly what
    the job copies (labels finalized meanwhile go to the next export). The copied rows commit with
    the transaction; progress (rows_done) is written on other connections, so it shows at once.
    The job also holds a session advisory lock on its export: the sweeper marks failed an export
    'building' whose lock is free, one whose process stopped (see repo.fail_abandoned_jobs).
    """

    def __init__(self, pool: asyncpg.Pool, settings: ExportSettings, view: IdentityView) -> None:
        self._pool = pool
        self._settings = settings
        self._view = view
        # References to the running jobs: the event loop keeps only weak ones.
        self._jobs: set[asyncio.Task[None]] = set()

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
        keep = _filter_of(request.filter)
        errors = filter_errors(keep)
        if errors:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "invalid export filter: " + "; ".join(errors)
            )
        row = await self.start(request.project_id, fmt, spec, keep)
        return _info(row)

    async def GetExport(
        self, request: export_pb2.GetExportRequest, context: Context
    ) -> export_pb2.ExportInfo:
        row = await self.find(request.export_id, context)
        return _info(row)

    async def ListExports(
        self, request: export_pb2.ListExportsRequest, context: Context
    ) -> export_pb2.ListExportsResponse:
        if not request.project_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "project_id is required")
        if request.limit < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "limit must not be negative")
        limit = min(request.limit or DEFAULT_LIST, MAX_LIST)
        async with self._pool.acquire() as conn:
            rows = await repo.list_exports(conn, request.project_id, limit)
        return export_pb2.ListExportsResponse(exports=[_info(r) for r in rows])

    async def StreamExport(
        self, request: export_pb2.StreamExportRequest, context: Context
    ) -> AsyncIterator[export_pb2.ExportChunk]:
        row = await self.find(request.export_id, context)
        try:
            # A cancelled call cancels this wait; a deadline is kept by the wait itself.
            row = await asyncio.wait_for(self.wait_ready(row), timeout=context.time_remaining())
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"export {request.export_id} still building"
            )
        except ExportFailed as exc:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"export {request.export_id} failed: {exc}"
            )
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

    # -- jobs ------------------------------------------------------------------------------------

    async def start(
        self, project_id: str, fmt: str, spec: SplitSpec | None, keep: ExportFilter
    ) -> asyncpg.Record:
        """Commit a new export (state building, rows_total counted) and start its job."""
        export_id = uuid.uuid4()
        conn: asyncpg.Connection = await self._pool.acquire()
        tx: asyncpg.transaction.Transaction | None = None
        created = False
        try:
            # Locked before the row exists: the sweeper never sees this export without its lock.
            await repo.lock_job(conn, export_id)
            async with self._pool.acquire() as other:
                await repo.create_export(
                    other, export_id, project_id, fmt, keep, self._settings.retention_hours
                )
                created = True
                # Its first statement fixes the transaction's snapshot, after the row committed.
                tx = conn.transaction(isolation="repeatable_read")
                await tx.start()
                total, pending = await repo.count_rows(conn, project_id, keep)
                await repo.set_counts(other, export_id, total, pending)
                row = await repo.get_export(other, str(export_id))
            assert row is not None
        except BaseException as exc:
            await self._end(conn, tx, export_id, f"could not start: {exc}" if created else None)
            raise
        BUILDING.inc()
        task = asyncio.create_task(self._build(conn, tx, row, spec, keep), name=f"export-{export_id}")
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        return row

    async def snapshot(self, project_id: str) -> str:
        """A fresh JSONL snapshot of every final label of the project, once ready: its id."""
        row = await self.wait_ready(await self.start(project_id, formats.JSONL, None, ExportFilter()))
        return str(row["export_id"])

    async def wait_ready(self, row: asyncpg.Record) -> asyncpg.Record:
        """The export's row once its job has ended; ExportFailed when it failed."""
        while row["state"] == service.BUILDING:
            await asyncio.sleep(self._settings.wait_poll_seconds)
            async with self._pool.acquire() as conn:
                fresh = await repo.get_export(conn, str(row["export_id"]))
            if fresh is None:
                raise ExportFailed("deleted while building")
            row = fresh
        if row["state"] == service.FAILED:
            raise ExportFailed(row["error"])
        return row

    async def run_jobs(self, stop: asyncio.Event) -> None:
        """Background task: on stop, the running jobs are cancelled (each marks its export
        failed, interrupted; a job's rows are rolled back with its transaction)."""
        await stop.wait()
        jobs = list(self._jobs)
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)

    async def _build(
        self,
        conn: asyncpg.Connection,
        tx: asyncpg.transaction.Transaction,
        row: asyncpg.Record,
        spec: SplitSpec | None,
        keep: ExportFilter,
    ) -> None:
        export_id: uuid.UUID = row["export_id"]
        started = time.monotonic()
        error: str | None = service.INTERRUPTED
        try:
            by_source: dict[str, int] = {}
            after: uuid.UUID | None = None
            done = 0
            while True:
                after, counts = await repo.copy_page(
                    conn, export_id, row["project_id"], keep, after, self._settings.page_rows
                )
                copied = sum(counts.values())
                for source, n in counts.items():
                    by_source[source] = by_source.get(source, 0) + n
                if copied:
                    done += copied
                    async with self._pool.acquire() as other:
                        await repo.set_rows_done(other, export_id, done)
                if after is None or copied < self._settings.page_rows:
                    break
            by_split: dict[str, int] = {}
            if spec is not None:
                items = await repo.split_inputs(conn, export_id)
                # CPU-bound over every row: off the event loop, so other calls are served.
                splits = await asyncio.to_thread(assign, items, spec)
                await repo.write_splits(conn, export_id, splits)
                for split in splits.values():
                    by_split[split] = by_split.get(split, 0) + 1
            copied_at = time.monotonic()
            # After the split: the split is part of each line, so of the content.
            checksum = await self._checksum(conn, export_id)
            summed_at = time.monotonic()
            await tx.commit()
            await repo.finish_export(conn, export_id, by_source, by_split, checksum)
            error = None
            SECONDS.observe(time.monotonic() - started)
            ROWS.inc(done)
            log.info(
                "export %s v%d ready: %d rows (copy and split %.1f s, checksum %.1f s), sha256 %s",
                export_id,
                row["version"],
                done,
                copied_at - started,
                summed_at - copied_at,
                checksum,
            )
        except asyncio.CancelledError:
            log.warning("export %s interrupted while building", export_id)
            raise
        except Exception as exc:
            log.exception("export %s failed", export_id)
            error = f"{type(exc).__name__}: {exc}"
        finally:
            BUILDING.dec()
            await self._end(conn, tx, export_id, error)

    async def _checksum(self, conn: asyncpg.Connection, export_id: uuid.UUID) -> str:
        """Hex SHA-256 of the snapshot's JSONL, the bytes _stream_jsonl sends: one more read of
        the rows, hashed in batches off the event loop."""
        digest = hashlib.sha256()
        batch = self._settings.chunk_lines
        lines: list[str] = []
        async for line in repo.stream_lines(conn, str(export_id), batch):
            lines.append(line)
            if len(lines) >= batch:
                await asyncio.to_thread(digest.update, ("\n".join(lines) + "\n").encode())
                lines = []
        if lines:
            await asyncio.to_thread(digest.update, ("\n".join(lines) + "\n").encode())
        return digest.hexdigest()

    async def _end(
        self,
        conn: asyncpg.Connection,
        tx: asyncpg.transaction.Transaction | None,
        export_id: uuid.UUID,
        error: str | None,
    ) -> None:
        """A job's end whatever happened: roll back what is not committed, mark the export failed
        when `error` is set, unlock, and give the connection back. Bounded, since it also runs
        while the service stops."""
        try:
            if tx is not None and error is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(tx.rollback(), timeout=5)
            if error is not None:
                try:
                    async with self._pool.acquire(timeout=5) as other:
                        await repo.fail_export(other, export_id, error)
                except Exception:
                    # The sweeper marks it failed once this connection's lock is gone.
                    log.warning("could not mark export %s failed", export_id, exc_info=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(repo.unlock_job(conn, export_id), timeout=5)
        finally:
            await self._pool.release(conn, timeout=5)

    # -- streaming -------------------------------------------------------------------------------

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

    async def find(self, export_id: str, context: Context) -> asyncpg.Record:
        """The export's row; INVALID_ARGUMENT, NOT_FOUND or PERMISSION_DENIED otherwise."""
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
    """Deletes snapshots past the retention (each is a full copy of its project's rows), and marks
    failed the exports left building by a process that stopped (the first sweep runs at start)."""

    def __init__(self, pool: asyncpg.Pool, settings: ExportSettings) -> None:
        self._pool = pool
        self._settings = settings

    async def sweep(self) -> int:
        cutoff = expiry_cutoff(datetime.now(UTC), self._settings.retention_hours)
        async with self._pool.acquire() as conn:
            abandoned = await repo.fail_abandoned_jobs(conn, service.INTERRUPTED)
            deleted = await repo.delete_exports_before(conn, cutoff)
        if abandoned:
            log.warning("marked %d export jobs failed: their process stopped while building", abandoned)
        if deleted:
            EXPIRED.inc(deleted)
            log.info("deleted %d expired export snapshots", deleted)
        return deleted

    async def loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.sweep()
            except Exception as exc:
                if not is_transient(exc):
                    raise
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
