"""Bus and gRPC edge of the export service."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import grpc
from prometheus_client import Counter, Histogram

from services.common.auth import IdentityView, require_project
from services.common.bus.worker import Delivery
from services.common.errors import PermanentError
from services.common.grpc_context import Context
from services.export import repo
from services.export.service import RawLabel, person_of
from services.export.settings import ExportSettings
from services.gen.tandem.export.v1 import export_pb2, export_pb2_grpc
from services.gen.tandem.items.v1 import items_pb2
from services.gen.tandem.labels.v1 import labels_pb2
from services.gen.tandem.stats.v1 import stats_pb2, stats_pb2_grpc

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
            )
        )
    return out


def _info(row: asyncpg.Record) -> export_pb2.ExportInfo:
    return export_pb2.ExportInfo(
        export_id=str(row["export_id"]),
        project_id=row["project_id"],
        rows=row["rows"],
        pending=row["pending"],
        rows_by_source=json.loads(row["rows_by_source"]),
        created_unix_ms=int(row["created_at"].timestamp() * 1000),
    )


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
        with SECONDS.time():
            async with self._pool.acquire() as conn, conn.transaction():
                row = await repo.create_snapshot(conn, request.project_id)
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
        await self._find(request.export_id, context)
        lines: list[str] = []
        async with self._pool.acquire() as conn:
            async for line in repo.stream_lines(conn, request.export_id, self._settings.chunk_lines):
                lines.append(line)
                if len(lines) >= self._settings.chunk_lines:
                    yield export_pb2.ExportChunk(jsonl=("\n".join(lines) + "\n").encode())
                    lines = []
        if lines:
            yield export_pb2.ExportChunk(jsonl=("\n".join(lines) + "\n").encode())

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
