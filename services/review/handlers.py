"""Bus and gRPC edge of the review service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import asyncpg
import grpc
from prometheus_client import Counter, Gauge

from services.common.bus.outbox import OutboxRelay, Outgoing
from services.common.bus.worker import Delivery
from services.common.grpc_context import Context
from services.common.projects import ProjectDirectory
from services.gen.tandem.labels.v1 import labels_pb2
from services.gen.tandem.review.v1 import review_pb2, review_pb2_grpc
from services.gen.tandem.stats.v1 import stats_pb2, stats_pb2_grpc
from services.gen.tandem.tasks.v1 import tasks_pb2
from services.review import repo
from services.review.repo import TaskRow
from services.review.settings import ReviewSettings

log = logging.getLogger(__name__)

LABELS = Counter("tandem_review_labels_total", "Human labels accepted.")
WITHDRAWN = Counter("tandem_review_withdrawn_total", "Open tasks withdrawn.")
EXPIRED = Counter("tandem_review_leases_expired_total", "Leases that expired and returned to the queue.")
QUEUE = Gauge("tandem_review_queue_depth", "Review tasks by state.", ["state"])


class TaskConsumer:
    """Keeps review.tasks in step with the scorer's requests and withdrawals."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def __call__(self, delivery: Delivery) -> None:
        message = delivery.message
        async with self._pool.acquire() as conn, conn.transaction():
            if isinstance(message, tasks_pb2.ReviewTaskBatch):
                await repo.upsert_tasks(conn, message.tasks)
            elif isinstance(message, tasks_pb2.TaskWithdrawalBatch):
                WITHDRAWN.inc(await repo.withdraw(conn, message.item_ids))


class ReviewDesk:
    """Leases tasks to annotators and turns their answers into human and final labels."""

    def __init__(
        self, pool: asyncpg.Pool, relay: OutboxRelay, projects: ProjectDirectory, settings: ReviewSettings
    ) -> None:
        self.pool = pool
        self._relay = relay
        self._projects = projects
        self._settings = settings

    async def task_message(self, row: TaskRow) -> review_pb2.Task:
        project = await self._projects.get(row.project_id)
        return review_pb2.Task(
            task_id=row.task_id,
            item_id=row.item_id,
            project_id=row.project_id,
            external_id=row.external_id,
            text=row.text,
            labels=project.label_names,
            suggested_label=row.suggested_label,
            confidence=row.confidence,
            reason=row.reason,
            lease_id=row.lease_id or "",
            lease_expires_unix_ms=int(row.lease_expires_at.timestamp() * 1000) if row.lease_expires_at else 0,
            synthetic=row.synthetic,
            round=row.round,
        )

    def lease_for(self, requested: float) -> float:
        return min(requested or self._settings.lease_seconds, self._settings.max_lease_seconds)

    async def submit(self, request: review_pb2.SubmitLabelRequest, context: Context) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await repo.lock_task(conn, request.task_id)
            if row is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no task {request.task_id}")
            assert row is not None
            project = await self._projects.get(row.project_id)
            if request.label not in project.label_names:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"label {request.label!r} is not one of {', '.join(project.label_names)}",
                )
            if row.state == "done":
                # A retried submit from the same person is fine; the task has its label already.
                if await repo.has_annotation(conn, row.task_id, request.annotator_id):
                    return False
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this task already has its label")
            if row.state == "leased" and row.lease_id != request.lease_id:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the task is leased to someone else")
            if row.state == "withdrawn":
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "the task was withdrawn: its label was accepted automatically",
                )
            labeled_at = await repo.complete(
                conn, row.task_id, request.annotator_id, request.label, request.seconds_spent
            )
            ms = int(labeled_at.timestamp() * 1000)
            human = labels_pb2.HumanLabelBatch(
                batch_id=row.task_id,
                project_id=row.project_id,
                labels=[
                    labels_pb2.HumanLabel(
                        item_id=row.item_id,
                        task_id=row.task_id,
                        label=request.label,
                        annotator_id=request.annotator_id,
                        seconds_spent=request.seconds_spent,
                        labeled_unix_ms=ms,
                        reason=row.reason,
                    )
                ],
            )
            final = labels_pb2.FinalLabelBatch(
                batch_id=row.task_id,
                project_id=row.project_id,
                labels=[
                    labels_pb2.FinalLabel(
                        item_id=row.item_id,
                        label=request.label,
                        source=labels_pb2.LABEL_SOURCE_HUMAN,
                        confidence=1.0,
                        annotator_ids=[request.annotator_id],
                        finalized_unix_ms=ms,
                    )
                ],
            )
            outgoing = [Outgoing(f"annotated:{row.task_id}", human)]
            if row.round == 0:
                # A second opinion is settled by the scorer, which knows the first label and the model's.
                outgoing.append(Outgoing(f"final:human:{row.task_id}", final))
            await repo.publish(conn, outgoing)
        self._relay.notify()
        LABELS.inc()
        return True

    async def lease_sweeper(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async with self.pool.acquire() as conn:
                    expired = await repo.expire_leases(conn)
                    for state, n in (await repo.queue_depth(conn)).items():
                        QUEUE.labels(state).set(n)
                if expired:
                    EXPIRED.inc(expired)
                    log.info("%d expired leases returned to the queue", expired)
            except (OSError, asyncpg.PostgresError):
                log.warning("lease sweep failed; retrying", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._settings.lease_sweep_seconds)


class ReviewServicer(review_pb2_grpc.ReviewServiceServicer):
    def __init__(self, desk: ReviewDesk) -> None:
        self._desk = desk

    async def NextTask(self, request: review_pb2.NextTaskRequest, context: Context) -> review_pb2.Task:
        if not request.annotator_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "annotator_id is required")
        async with self._desk.pool.acquire() as conn:
            row = await repo.claim_next(
                conn, request.project_id, request.annotator_id, self._desk.lease_for(request.lease_seconds)
            )
        if row is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no task waiting in this project")
        assert row is not None
        return await self._desk.task_message(row)

    async def SubmitLabel(
        self, request: review_pb2.SubmitLabelRequest, context: Context
    ) -> review_pb2.SubmitLabelResponse:
        await _check_task_id(request.task_id, context)
        if not request.annotator_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "annotator_id is required")
        return review_pb2.SubmitLabelResponse(accepted=await self._desk.submit(request, context))

    async def SkipTask(
        self, request: review_pb2.SkipTaskRequest, context: Context
    ) -> review_pb2.SkipTaskResponse:
        await _check_task_id(request.task_id, context)
        async with self._desk.pool.acquire() as conn, conn.transaction():
            row = await repo.lock_task(conn, request.task_id)
            if row is None or row.state != "leased" or row.lease_id != request.lease_id:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no lease on this task to give back")
            await repo.release(conn, request.task_id, skipped=True)
        return review_pb2.SkipTaskResponse()

    async def ExtendLease(self, request: review_pb2.ExtendLeaseRequest, context: Context) -> review_pb2.Task:
        await _check_task_id(request.task_id, context)
        async with self._desk.pool.acquire() as conn, conn.transaction():
            row = await repo.lock_task(conn, request.task_id)
            if row is None or row.state != "leased" or row.lease_id != request.lease_id:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION, "the lease has expired or is not yours"
                )
            extended = await repo.extend(conn, request.task_id, self._desk.lease_for(request.lease_seconds))
        assert extended is not None
        return await self._desk.task_message(extended)


async def _check_task_id(task_id: str, context: Context) -> None:
    try:
        uuid.UUID(task_id)
    except ValueError:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"task_id {task_id!r} is not a task id")


class ReviewStatsServicer(stats_pb2_grpc.StatsServiceServicer):
    def __init__(self, desk: ReviewDesk) -> None:
        self._desk = desk

    async def GetProjectStats(
        self, request: stats_pb2.GetProjectStatsRequest, context: Context
    ) -> stats_pb2.ProjectStats:
        async with self._desk.pool.acquire() as conn:
            c = await repo.counts(conn, request.project_id)
        return stats_pb2.ProjectStats(
            project_id=request.project_id,
            review=stats_pb2.ReviewStats(
                open=int(c["open"]),
                leased=int(c["leased"]),
                done=int(c["done"]),
                withdrawn=int(c["withdrawn"]),
                annotators=int(c["annotators"]),
                mean_seconds_per_label=float(c["mean_seconds"]),
            ),
        )
