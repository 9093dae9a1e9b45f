"""Bus and gRPC edge of the review service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import datetime

import asyncpg
import grpc
from prometheus_client import Counter, Gauge

from services.common.auth import caller
from services.common.bus.outbox import OutboxRelay, Outgoing
from services.common.bus.worker import Delivery
from services.common.grpc_context import Context
from services.common.projects import ProjectDirectory
from services.gen.tandem.labels.v1 import labels_pb2
from services.gen.tandem.review.v1 import review_pb2, review_pb2_grpc
from services.gen.tandem.stats.v1 import stats_pb2, stats_pb2_grpc
from services.gen.tandem.tasks.v1 import tasks_pb2
from services.review import repo, service
from services.review.service import LeaseClaim, Reason, Refused, State, Submit, Task
from services.review.settings import ReviewSettings

log = logging.getLogger(__name__)

LABELS = Counter("tandem_review_labels_total", "Human labels accepted.")
WITHDRAWN = Counter(
    "tandem_review_withdrawn_total", "Tasks withdrawn: open, or when a withdrawn task's lease ended."
)
EXPIRED = Counter("tandem_review_leases_expired_total", "Leases that expired unanswered.")
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
                WITHDRAWN.inc(await repo.withdraw(conn, message.project_id, message.item_ids))


class ReviewDesk:
    """Leases tasks to annotators and turns their answers into human and final labels.

    I/O only: it reads the task and its item's labels, asks `service` whether the caller may act,
    writes, and publishes through the outbox. A refusal leaves as `service.Refused`."""

    def __init__(
        self, pool: asyncpg.Pool, relay: OutboxRelay, projects: ProjectDirectory, settings: ReviewSettings
    ) -> None:
        self.pool = pool
        self._relay = relay
        self._projects = projects
        self._settings = settings

    async def task_message(self, task: Task) -> review_pb2.Task:
        project = await self._projects.get(task.project_id)
        shown = service.shows_suggestion(task, project.hide_suggestions)
        return review_pb2.Task(
            task_id=task.task_id,
            item_id=task.item_id,
            project_id=task.project_id,
            external_id=task.external_id,
            text=task.text,
            labels=project.label_names,
            suggested_label=task.suggested_label if shown else "",
            confidence=task.confidence if shown else 0.0,
            reason=task.reason,
            lease_id=task.lease_id or "",
            lease_expires_unix_ms=int(task.lease_expires_at.timestamp() * 1000)
            if task.lease_expires_at
            else 0,
            synthetic=task.synthetic,
            round=task.round,
        )

    def lease_for(self, requested: float) -> float:
        return service.lease_seconds(
            requested, self._settings.lease_seconds, self._settings.max_lease_seconds
        )

    async def claim(self, request: review_pb2.NextTaskRequest, annotator_id: str) -> Task | None:
        async with self.pool.acquire() as conn:
            return await repo.claim_next(
                conn,
                request.project_id,
                annotator_id,
                self.lease_for(request.lease_seconds),
                second_opinions_only=request.second_opinions_only,
                include_skipped=request.include_skipped,
            )

    async def submit(self, request: review_pb2.SubmitLabelRequest, annotator_id: str) -> bool:
        """True when the label is recorded, False for a retry of the caller's accepted submit."""
        async with self.pool.acquire() as conn, conn.transaction():
            task, now = await _lock(conn, request.task_id)
            project = await self._projects.get(task.project_id)
            # Read inside the transaction, with the task locked: a second opinion is checked
            # against the labels as they are when it is recorded, not when it was claimed.
            prior = await repo.item_labels(conn, task.item_id)
            verdict = service.check_submit(
                task,
                LeaseClaim(annotator_id, request.lease_id, now),
                request.label,
                project.label_names,
                prior,
            )
            if verdict is Submit.ALREADY_RECORDED:
                return False
            labeled_at = await repo.complete(
                conn, task.task_id, annotator_id, request.label, request.seconds_spent
            )
            await repo.publish(conn, _label_messages(task, annotator_id, request, labeled_at))
        self._relay.notify()
        LABELS.inc()
        return True

    async def skip(self, request: review_pb2.SkipTaskRequest, annotator_id: str) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            task, now = await _lock(conn, request.task_id)
            service.check_lease(task, LeaseClaim(annotator_id, request.lease_id, now))
            after = service.state_after_lease(task)
            await repo.release(conn, task.task_id, after, skipped=not request.release)
            if not request.release:
                await repo.record_skip(conn, task.task_id, annotator_id, request.reason)
        if after is State.WITHDRAWN:
            WITHDRAWN.inc()

    async def extend(self, request: review_pb2.ExtendLeaseRequest, annotator_id: str) -> Task:
        async with self.pool.acquire() as conn, conn.transaction():
            task, now = await _lock(conn, request.task_id)
            service.check_lease(task, LeaseClaim(annotator_id, request.lease_id, now))
            extended = await repo.extend(conn, request.task_id, self.lease_for(request.lease_seconds))
        assert extended is not None  # locked and leased above
        return extended

    async def lease_sweeper(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async with self.pool.acquire() as conn:
                    ended = await repo.expire_leases(conn)
                    for state, n in (await repo.queue_depth(conn)).items():
                        QUEUE.labels(state).set(n)
                requeued, withdrawn = ended.get(State.OPEN, 0), ended.get(State.WITHDRAWN, 0)
                if requeued or withdrawn:
                    EXPIRED.inc(requeued + withdrawn)
                    WITHDRAWN.inc(withdrawn)
                    log.info(
                        "expired leases: %d tasks back in the queue, %d withdrawn meanwhile",
                        requeued,
                        withdrawn,
                    )
            except (OSError, asyncpg.PostgresError):
                log.warning("lease sweep failed; retrying", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._settings.lease_sweep_seconds)


async def _lock(conn: asyncpg.Connection, task_id: str) -> tuple[Task, datetime]:
    locked = await repo.lock_task(conn, task_id)
    if locked is None:
        raise Refused(Reason.NO_TASK, f"no task {task_id}")
    return locked


def _label_messages(
    task: Task, annotator_id: str, request: review_pb2.SubmitLabelRequest, labeled_at: datetime
) -> list[Outgoing]:
    ms = int(labeled_at.timestamp() * 1000)
    human = labels_pb2.HumanLabelBatch(
        batch_id=task.task_id,
        project_id=task.project_id,
        labels=[
            labels_pb2.HumanLabel(
                item_id=task.item_id,
                task_id=task.task_id,
                label=request.label,
                annotator_id=annotator_id,
                seconds_spent=request.seconds_spent,
                labeled_unix_ms=ms,
                reason=task.reason,
            )
        ],
    )
    outgoing = [Outgoing(f"annotated:{task.task_id}", human)]
    if task.round == 0:
        # A second opinion is settled by the scorer, which knows the first label and the model's.
        final = labels_pb2.FinalLabelBatch(
            batch_id=task.task_id,
            project_id=task.project_id,
            labels=[
                labels_pb2.FinalLabel(
                    item_id=task.item_id,
                    label=request.label,
                    source=labels_pb2.LABEL_SOURCE_HUMAN,
                    confidence=1.0,
                    annotator_ids=[annotator_id],
                    finalized_unix_ms=ms,
                )
            ],
        )
        outgoing.append(Outgoing(f"final:human:{task.task_id}", final))
    return outgoing


# How each refusal reaches the client; every Reason has an entry (a unit test checks).
STATUS_OF: dict[Reason, grpc.StatusCode] = {
    Reason.NO_TASK: grpc.StatusCode.NOT_FOUND,
    Reason.UNKNOWN_LABEL: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.NOT_LEASED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.LEASE_HELD_BY_OTHER: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.LEASE_STALE: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.LEASE_EXPIRED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.ALREADY_LABELED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.WITHDRAWN: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.OWN_LABEL: grpc.StatusCode.PERMISSION_DENIED,
}


class ReviewServicer(review_pb2_grpc.ReviewServiceServicer):
    """The annotator is always the caller (the interceptor resolved their token)."""

    def __init__(self, desk: ReviewDesk) -> None:
        self._desk = desk

    async def NextTask(self, request: review_pb2.NextTaskRequest, context: Context) -> review_pb2.Task:
        task = await self._desk.claim(request, caller().user_id)
        if task is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no task waiting for you in this project")
        return await self._desk.task_message(task)

    async def SubmitLabel(
        self, request: review_pb2.SubmitLabelRequest, context: Context
    ) -> review_pb2.SubmitLabelResponse:
        await _check_task_id(request.task_id, context)
        try:
            accepted = await self._desk.submit(request, caller().user_id)
        except Refused as exc:
            await context.abort(STATUS_OF[exc.reason], exc.message)
        return review_pb2.SubmitLabelResponse(accepted=accepted)

    async def SkipTask(
        self, request: review_pb2.SkipTaskRequest, context: Context
    ) -> review_pb2.SkipTaskResponse:
        await _check_task_id(request.task_id, context)
        try:
            await self._desk.skip(request, caller().user_id)
        except Refused as exc:
            await context.abort(STATUS_OF[exc.reason], exc.message)
        return review_pb2.SkipTaskResponse()

    async def ExtendLease(self, request: review_pb2.ExtendLeaseRequest, context: Context) -> review_pb2.Task:
        await _check_task_id(request.task_id, context)
        try:
            extended = await self._desk.extend(request, caller().user_id)
        except Refused as exc:
            await context.abort(STATUS_OF[exc.reason], exc.message)
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
