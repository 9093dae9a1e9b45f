"""gRPC edge of the quality and fairness report (ReportService), served by the export service.

A report reads one snapshot's rows (a fresh one when none is named) in a single pass, off the
event loop, and publishes the slices it flags on tandem.quality.v1.slices_flagged through the
export's outbox: the scorer then audits those slices more. The flags are kept here too, so a report
says since when a slice is audited more.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import asyncpg
import grpc
from prometheus_client import Counter, Histogram

from services.common.auth import IdentityView
from services.common.bus.outbox import OutboxRelay, Outgoing, enqueue
from services.common.errors import UnknownProject
from services.common.grpc_context import Context
from services.common.projects import ProjectDirectory
from services.common.slices import ACCURACY_BELOW_TARGET, AUDITED_MORE, DISTRIBUTION_DRIFT
from services.export import repo
from services.export.handlers import ExportFailed
from services.export.report import QualityReport, build_report
from services.export.report_html import to_dict, to_html
from services.export.service import READY
from services.gen.tandem.export.v1 import export_pb2, export_pb2_grpc
from services.gen.tandem.quality.v1 import quality_pb2

log = logging.getLogger(__name__)

REPORTS = Counter("tandem_export_reports_total", "Quality reports made.")
FLAGGED = Counter(
    "tandem_export_slices_flagged_total", "Slices flagged by quality reports, by reason.", ["reason"]
)
REPORT_SECONDS = Histogram(
    "tandem_export_report_seconds", "Time to make a quality report (snapshot excluded)."
)

MAX_SLICE_FIELDS = 10
# Rows handed to the report's thread at a time, and chunks in flight: bounded memory.
_CHUNK_ROWS = 2000
_CHUNKS_AHEAD = 4
_END: list[dict[str, Any]] = []  # sentinels, told apart by identity
_FAILED: list[dict[str, Any]] = []

Snapshot = Callable[[str], Awaitable[str]]  # project id → a fresh snapshot's id, once ready
Find = Callable[[str, Context], Awaitable[asyncpg.Record]]  # export id → its row, access checked


def _flags(report: QualityReport) -> list[tuple[str, str, list[str]]]:
    out = []
    for s in report.slices:
        reasons = [
            r
            for r, on in (
                (ACCURACY_BELOW_TARGET, s.accuracy_below_target),
                (DISTRIBUTION_DRIFT, s.distribution_drift),
            )
            if on
        ]
        if reasons:
            out.append((s.field, s.value, reasons))
    return out


async def _rows_into(q: queue.Queue[list[dict[str, Any]]], lines: AsyncIterator[str]) -> None:
    """Feed parsed rows to the report's thread in chunks; the queue's bound is the back-pressure.
    The thread always gets an end: _END after the last row, _FAILED when reading stopped short (a
    report is never made of the rows read so far)."""
    ended = _FAILED
    try:
        chunk: list[dict[str, Any]] = []
        async for line in lines:
            chunk.append(json.loads(line))
            if len(chunk) >= _CHUNK_ROWS:
                await asyncio.to_thread(q.put, chunk)
                chunk = []
        await asyncio.to_thread(q.put, chunk)
        ended = _END
    finally:
        # Bounded: a thread that already stopped (its report raised) takes nothing any more.
        with contextlib.suppress(queue.Full):
            await asyncio.to_thread(q.put, ended, True, 30.0)


def _drain(q: queue.Queue[list[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    while (chunk := q.get()) is not _END:
        if chunk is _FAILED:
            raise RuntimeError("the snapshot's rows could not be read to their end")
        yield from chunk


class ReportServicer(export_pb2_grpc.ReportServiceServicer):
    def __init__(
        self,
        pool: asyncpg.Pool,
        view: IdentityView,
        projects: ProjectDirectory,
        relay: OutboxRelay,
        snapshot: Snapshot,
        find: Find,
    ) -> None:
        self._pool = pool
        self._view = view
        self._projects = projects
        self._relay = relay
        self._snapshot = snapshot
        self._find = find

    async def GetReport(self, request: export_pb2.GetReportRequest, context: Context) -> export_pb2.Report:
        fields = [f.strip() for f in request.slice_fields]
        if not request.project_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "project_id is required")
        if not fields or any(not f for f in fields) or len(fields) > MAX_SLICE_FIELDS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"name 1 to {MAX_SLICE_FIELDS} slice fields (metadata fields of the items), none empty",
            )
        try:
            project = await self._projects.get(request.project_id)
        except UnknownProject:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no project {request.project_id}")
        try:
            export_id = request.export_id or await self._snapshot(request.project_id)
        except ExportFailed as exc:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"the snapshot to report on failed: {exc}"
            )
        row = await self._find(export_id, context)
        if row["project_id"] != request.project_id:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no export {export_id} of {request.project_id}")
        if row["state"] != READY:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"export {export_id} is {row['state']}, not ready: ask when it is",
            )
        report = await self._build(export_id, fields, project.target_accuracy or 0.95, request.project_id)
        flagged = _flags(report)
        raised = await self._publish(request.project_id, fields, flagged)
        # The report says since when the scorer audits each flagged slice more.
        report = replace(
            report,
            slices=tuple(
                replace(s, audit_raised_since_unix_ms=raised.get((s.field, s.value), 0))
                for s in report.slices
            ),
        )
        REPORTS.inc()
        return export_pb2.Report(
            export_id=export_id,
            json=json.dumps(to_dict(report)),
            html=to_html(report) if request.html else "",
            flagged=[
                export_pb2.SliceFlag(
                    field=f,
                    value=v,
                    reasons=reasons,
                    accuracy_low=s.audited_accuracy.low,
                    accuracy_high=s.audited_accuracy.high,
                )
                for s in report.slices
                for f, v, reasons in flagged
                if (s.field, s.value) == (f, v)
            ],
        )

    async def _build(
        self, export_id: str, fields: Sequence[str], target: float, project_id: str
    ) -> QualityReport:
        q: queue.Queue[list[dict[str, Any]]] = queue.Queue(maxsize=_CHUNKS_AHEAD)
        started = time.perf_counter()
        async with self._pool.acquire() as conn:
            feeding = asyncio.create_task(_rows_into(q, repo.stream_lines(conn, export_id, _CHUNK_ROWS)))
            try:
                report = await asyncio.to_thread(build_report, _drain(q), fields, target, project_id)
            finally:
                if not feeding.done():
                    feeding.cancel()
            await feeding
        REPORT_SECONDS.observe(time.perf_counter() - started)
        return report

    async def _publish(
        self, project_id: str, fields: Sequence[str], flagged: list[tuple[str, str, list[str]]]
    ) -> dict[tuple[str, str], int]:
        """Keep the flags and send them to the scorer (one transaction: both or neither).
        Returns (field, value) → since when each flagged slice is audited more (unix ms)."""
        report_id = str(uuid.uuid4())
        message = quality_pb2.SliceFlags(
            report_id=report_id,
            project_id=project_id,
            fields=list(fields),
            flagged=[quality_pb2.FlaggedSlice(field=f, value=v, reasons=r) for f, v, r in flagged],
            reported_unix_ms=int(time.time() * 1000),
        )
        # Kept for "audited more since": the slices the scorer acts on (services/common/slices.py).
        audited_more = [(f, v, r) for f, v, r in flagged if AUDITED_MORE in r]
        async with self._pool.acquire() as conn, conn.transaction():
            since = await repo.replace_slice_flags(conn, project_id, fields, audited_more)
            await enqueue(conn, repo.SCHEMA, [Outgoing(f"report:{report_id}", message)])
        self._relay.notify()
        for _, _, reasons in flagged:
            for r in reasons:
                FLAGGED.labels(r).inc()
        if flagged:
            log.info("report on %s flagged %s", project_id, [f"{f}={v}" for f, v, _ in flagged])
        return since
