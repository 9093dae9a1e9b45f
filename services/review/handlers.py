"""Bus and gRPC edge of the review service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
import uuid
from collections.abc import Sequence
from datetime import datetime

import asyncpg
import grpc
from prometheus_client import Counter, Gauge

from services.common.auth import caller
from services.common.bus.outbox import OutboxRelay, Outgoing
from services.common.bus.worker import Delivery
from services.common.errors import is_transient
from services.common.grpc_context import Context
from services.common.projects import ProjectDirectory, ProjectSpec
from services.gen.tandem.items.v1 import items_pb2
from services.gen.tandem.labels.v1 import labels_pb2
from services.gen.tandem.review.v1 import review_pb2, review_pb2_grpc
from services.gen.tandem.stats.v1 import stats_pb2, stats_pb2_grpc
from services.gen.tandem.tasks.v1 import tasks_pb2
from services.review import repo, service, workforce_repo
from services.review.consensus import ConsensusKeeper, Settled, settle_item
from services.review.service import GoldPolicy, LeaseClaim, Reason, Refused, Settle, State, Submit, Task
from services.review.settings import ReviewSettings

log = logging.getLogger(__name__)

LABELS = Counter("tandem_review_labels_total", "Human labels accepted.")
WITHDRAWN = Counter(
    "tandem_review_withdrawn_total", "Tasks withdrawn: open, or when a withdrawn task's lease ended."
)
EXPIRED = Counter("tandem_review_leases_expired_total", "Leases that expired unanswered.")
QUEUE = Gauge("tandem_review_queue_depth", "Review tasks by pool and state.", ["pool", "state"])
OLDEST = Gauge("tandem_review_oldest_open_seconds", "Age of the oldest open task, by pool.", ["pool"])
POOL_LABELS = Counter("tandem_review_pool_labels_total", "Human labels accepted, by pool.", ["pool"])
GOLD = Counter("tandem_review_gold_answers_total", "Gold answers, by pool and outcome.", ["pool", "outcome"])
PAUSES = Counter("tandem_review_pauses_total", "People paused by the gold check, by pool.", ["pool"])
OVERLAP = Counter("tandem_review_overlap_asked_total", "Extra people asked for an item (dynamic overlap).")
CONSENSUS = Counter(
    "tandem_review_consensus_total", "Items settled from several labels, by method.", ["method"]
)


class TaskConsumer:
    """Keeps review.tasks in step with the scorer's requests and withdrawals, routing each new
    task: as many tasks as the item needs people (overlap), each to a pool by the project's shares."""

    def __init__(self, pool: asyncpg.Pool, projects: ProjectDirectory) -> None:
        self._pool = pool
        self._projects = projects

    async def __call__(self, delivery: Delivery) -> None:
        message = delivery.message
        if isinstance(message, tasks_pb2.ReviewTaskBatch):
            # Each task names its project (the batch's is a default): route it by that project.
            projects = {
                pid: await self._projects.get(pid)
                for pid in {t.project_id or message.project_id for t in message.tasks if t.text}
            }
            full = [
                n
                for t in message.tasks
                if t.text
                for n in _routed(t, projects[t.project_id or message.project_id])
            ]
            rerank = [repo.Rerank(t.item_id, t.priority, t.reason) for t in message.tasks if not t.text]
            async with self._pool.acquire() as conn, conn.transaction():
                for project in projects.values():
                    if project.skill_fields:
                        await repo.lock_skills(conn, project.project_id)
                await repo.upsert_tasks(conn, full, rerank)
        elif isinstance(message, tasks_pb2.TaskWithdrawalBatch):
            async with self._pool.acquire() as conn, conn.transaction():
                WITHDRAWN.inc(await repo.withdraw(conn, message.project_id, message.item_ids))


def _routed(t: tasks_pb2.ReviewTask, project: ProjectSpec) -> list[repo.NewTask]:
    slots = 1
    if t.round == 0:
        slots = service.slots_needed(
            project.overlap, project.max_overlap, project.overlap_below_confidence, t.confidence
        )
    out = []
    for slot in range(slots):
        tid = repo.task_id(t.item_id, t.round, slot)
        out.append(
            repo.NewTask(
                task_id=tid,
                item_id=t.item_id,
                project_id=project.project_id,
                external_id=t.external_id,
                text=t.text,
                suggested_label=t.suggested_label,
                confidence=t.confidence,
                reason=t.reason,
                priority=t.priority,
                synthetic=t.synthetic,
                round=t.round,
                slot=slot,
                pool_id=service.pool_for_task(tid, project.pools),
            )
        )
    return out


class ItemConsumer:
    """Keeps the skills each item's review needs, from its metadata (projects with skill fields)."""

    def __init__(self, pool: asyncpg.Pool, projects: ProjectDirectory) -> None:
        self._pool = pool
        self._projects = projects

    async def __call__(self, delivery: Delivery) -> None:
        batch = delivery.message
        assert isinstance(batch, items_pb2.ItemBatch)
        by_project: dict[str, list[items_pb2.Item]] = {}
        for item in batch.items:
            by_project.setdefault(item.project_id or batch.project_id, []).append(item)
        for project_id, items in by_project.items():
            project = await self._projects.get(project_id)
            if not project.skill_fields:
                continue
            needs = [(it.item_id, service.skills_for(project.skill_fields, it.metadata)) for it in items]
            needs = [(item_id, skills) for item_id, skills in needs if skills]
            if needs:
                async with self._pool.acquire() as conn, conn.transaction():
                    await repo.lock_skills(conn, project_id)
                    await repo.record_item_skills(conn, project_id, needs)


class ReviewDesk:
    """Leases tasks to annotators and turns their answers into human and final labels.

    I/O only: it reads the person, the task and its item's labels, asks `service` whether the caller
    may act and what follows, writes, and publishes through the outbox. A refusal leaves as
    `service.Refused`."""

    def __init__(
        self, pool: asyncpg.Pool, relay: OutboxRelay, projects: ProjectDirectory, settings: ReviewSettings
    ) -> None:
        self.pool = pool
        self._relay = relay
        self._projects = projects
        self._settings = settings
        self._gold_counts: dict[str, tuple[float, int]] = {}
        self._random = random.Random()
        self.consensus = ConsensusKeeper(pool, projects, settings.aggregate_seconds, self._republish)

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

    async def _gold_count(self, conn: asyncpg.Connection, project_id: str) -> int:
        cached = self._gold_counts.get(project_id)
        if cached is not None and time.monotonic() - cached[0] < 10.0:
            return cached[1]
        n = await workforce_repo.gold_count(conn, project_id)
        self._gold_counts[project_id] = (time.monotonic(), n)
        return n

    async def claim(
        self,
        project_id: str,
        annotator_id: str,
        lease_seconds: float = 0.0,
        *,
        second_opinions_only: bool = False,
        include_skipped: bool = False,
        vendor_pool: str | None = None,
    ) -> Task | None:
        """The next task for a person: a gold question when their schedule says so, else the head
        of their pool's queue. Refused when they are paused, outside the project's pools or at
        capacity; None when nothing is waiting for them."""
        project = await self._projects.get(project_id)
        async with self.pool.acquire() as conn, conn.transaction():
            # A claim need not wait for its WAL flush: lost in a crash, it is a lease that never
            # was (the task is still open; the holder's submit is refused and they take another).
            await conn.execute("SET LOCAL synchronous_commit TO off")
            pool_id, skills, own_cap = await repo.lock_person(conn, annotator_id)
            standing, holding = await repo.standing(conn, project_id, annotator_id)
            person = service.Person(annotator_id, pool_id, skills, own_cap, holding)
            if vendor_pool is not None and vendor_pool not in project.pool_ids:
                raise Refused(
                    Reason.NOT_IN_POOL, f"project {project_id!r} does not name pool {vendor_pool!r}"
                )
            queue = service.queue_for(project.pool_ids, person, standing)
            load = await repo.pool_load(conn, person.pool_id) if person.pool_id else None
            service.check_capacity(
                person,
                self._settings.max_leased_per_person,
                load[1] if load else None,
                load[0] if load else 0,
            )
            lease = self.lease_for(lease_seconds)
            task: Task | None = None
            policy = GoldPolicy.of(
                project.gold_first, project.gold_first_share, project.gold_share, project.quality_bar
            )
            if (
                not second_opinions_only
                and service.wants_gold(policy, standing, self._random.random())
                and await self._gold_count(conn, project_id)
            ):
                task = await workforce_repo.claim_gold(conn, project_id, annotator_id, person.pool_id, lease)
            if task is None:
                task = await repo.claim_next(
                    conn,
                    project_id,
                    person,
                    queue,
                    lease,
                    sla_seconds=project.sla_seconds,
                    second_opinions_only=second_opinions_only,
                    include_skipped=include_skipped,
                )
            if task is not None and task.gold:
                await repo.served(conn, project_id, annotator_id, gold=True)  # claim_next counts its own
            return task

    async def submit(
        self, task_id: str, lease_id: str, label: str, seconds: float, annotator_id: str
    ) -> bool:
        """True when the label is recorded, False for a retry of the caller's accepted submit."""
        async with self.pool.acquire() as conn, conn.transaction():
            locked = await repo.lock_task(conn, task_id)
            if locked is None:
                gold = await workforce_repo.lock_gold_task(conn, task_id)
                if gold is None:
                    raise Refused(Reason.NO_TASK, f"no task {task_id}")
                return await self._answer_gold(conn, gold, lease_id, label, seconds, annotator_id)
            task, now = locked
            project = await self._projects.get(task.project_id)
            # Read inside the transaction, with the task locked: a second opinion is checked
            # against the labels as they are when it is recorded, not when it was claimed.
            prior = await repo.item_labels(conn, task.item_id)
            verdict = service.check_submit(
                task, LeaseClaim(annotator_id, lease_id, now), label, project.label_names, prior
            )
            if verdict is Submit.ALREADY_RECORDED:
                return False
            pool_id = await _pool_of(conn, annotator_id)
            labeled_at = await repo.complete(conn, task.task_id, annotator_id, label, seconds, pool_id)
            raw = _human_label(task, annotator_id, label, seconds, labeled_at, pool_id)
            raw.blind = not service.shows_suggestion(task, project.hide_suggestions)
            outgoing = await self._after_label(conn, project, task, raw)
            await repo.publish(conn, outgoing)
        self._relay.notify()
        LABELS.inc()
        POOL_LABELS.labels(pool_id or "none").inc()
        return True

    async def _after_label(
        self, conn: asyncpg.Connection, project: ProjectSpec, task: Task, raw: labels_pb2.HumanLabel
    ) -> list[Outgoing]:
        """What a label leads to: alone, the item's human and final label; with overlap, the raw
        label now and, once the item's people agree (or the maximum is reached), the aggregate."""
        single = project.overlap <= 1 and project.max_overlap <= 1 and task.slot == 0
        if task.round != 0 or single:
            return _label_messages(task, raw)
        slots = await repo.item_slots(conn, task.item_id)
        if len(slots) <= 1 and project.max_overlap <= 1:
            return _label_messages(task, raw)
        raw.pending = True
        outgoing = [_human_batch(task, raw, f"annotated:{task.task_id}")]
        paused = await repo.paused(conn, task.project_id)
        needed = service.slots_needed(
            project.overlap, project.max_overlap, project.overlap_below_confidence, task.confidence
        )
        decision = service.settle(slots, needed, project.max_overlap, paused)
        if decision is Settle.ONE_MORE:
            slot = max(s.slot for s in slots) + 1
            new_id = repo.task_id(task.item_id, 0, slot)
            await repo.add_slot(conn, task, slot, service.pool_for_task(new_id, project.pools))
            OVERLAP.inc()
        elif decision is Settle.FINAL:
            votes = [(s.annotator_id, s.label) for s in slots if s.annotator_id and s.label]
            counted = [v for v in votes if v[0] not in paused] or votes
            settled = settle_item(self.consensus.model(task.project_id), project.label_names, counted)
            people = [a for a, _ in counted]
            await repo.record_consensus(
                conn, task.item_id, task.project_id, settled.label, settled.posterior, settled.method, people
            )
            outgoing += _consensus_messages(task, settled, people, raw.labeled_unix_ms)
            self.consensus.touched(task.project_id)
            CONSENSUS.labels(settled.method).inc()
        return outgoing

    async def _republish(self, project_id: str, changed: dict[str, Settled]) -> None:
        """After a refit: the aggregated labels that changed, recorded and published again."""
        ms = int(time.time() * 1000)
        async with self.pool.acquire() as conn, conn.transaction():
            outgoing = []
            for item_id, settled in changed.items():
                people = await conn.fetchval(
                    "SELECT annotators FROM review.consensus WHERE item_id = $1", uuid.UUID(item_id)
                )
                await repo.record_consensus(
                    conn, item_id, project_id, settled.label, settled.posterior, settled.method, people
                )
                outgoing.append(
                    Outgoing(
                        f"final:consensus:{item_id}:{settled.label}:{ms}",
                        _final_batch(
                            project_id, item_id, settled, list(people), ms, batch_id=f"re:{item_id}:{ms}"
                        ),
                    )
                )
            await repo.publish(conn, outgoing)
        self._relay.notify()

    async def _answer_gold(
        self,
        conn: asyncpg.Connection,
        gold: tuple[Task, datetime, str, str],
        lease_id: str,
        label: str,
        seconds: float,
        annotator_id: str,
    ) -> bool:
        task, now, answer, given = gold
        project = await self._projects.get(task.project_id)
        if label not in project.label_names:
            raise Refused(
                Reason.UNKNOWN_LABEL, f"label {label!r} is not one of {', '.join(project.label_names)}"
            )
        if task.state is State.DONE:
            if task.lease_owner == annotator_id and given == label:
                return False
            raise Refused(Reason.ALREADY_LABELED, "the task already has its label")
        service.check_lease(task, LeaseClaim(annotator_id, lease_id, now))
        standing = await workforce_repo.answer_gold(conn, task, label, label == answer, seconds)
        pool = task.pool_id or "none"
        GOLD.labels(pool, "right" if label == answer else "wrong").inc()
        policy = GoldPolicy.of(
            project.gold_first, project.gold_first_share, project.gold_share, project.quality_bar
        )
        if not standing.paused and service.below_bar(
            standing.gold_correct, standing.gold_answered, policy.bar
        ):
            reason = f"gold accuracy {standing.gold_correct}/{standing.gold_answered} is below the bar {policy.bar:.2f}"
            await workforce_repo.set_paused(conn, task.project_id, annotator_id, True, reason)
            PAUSES.labels(pool).inc()
            log.warning("paused %s on %s: %s", annotator_id, task.project_id, reason)
        return True

    async def skip(self, task_id: str, lease_id: str, reason: str, release: bool, annotator_id: str) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            locked = await repo.lock_task(conn, task_id)
            if locked is None:
                gold = await workforce_repo.lock_gold_task(conn, task_id)
                if gold is None:
                    raise Refused(Reason.NO_TASK, f"no task {task_id}")
                service.check_lease(gold[0], LeaseClaim(annotator_id, lease_id, gold[1]))
                await workforce_repo.drop_gold_task(conn, task_id)
                return
            task, now = locked
            service.check_lease(task, LeaseClaim(annotator_id, lease_id, now))
            after = service.state_after_lease(task)
            await repo.release(conn, task.task_id, after, skipped=not release)
            if not release:
                await repo.record_skip(conn, task.task_id, annotator_id, reason)
        if after is State.WITHDRAWN:
            WITHDRAWN.inc()

    async def extend(self, task_id: str, lease_id: str, seconds: float, annotator_id: str) -> Task:
        async with self.pool.acquire() as conn, conn.transaction():
            locked = await repo.lock_task(conn, task_id)
            if locked is None:
                gold = await workforce_repo.lock_gold_task(conn, task_id)
                if gold is None:
                    raise Refused(Reason.NO_TASK, f"no task {task_id}")
                service.check_lease(gold[0], LeaseClaim(annotator_id, lease_id, gold[1]))
                await workforce_repo.extend_gold(conn, task_id, self.lease_for(seconds))
                again = await workforce_repo.lock_gold_task(conn, task_id)
                assert again is not None
                return again[0]
            task, now = locked
            service.check_lease(task, LeaseClaim(annotator_id, lease_id, now))
            extended = await repo.extend(conn, task_id, self.lease_for(seconds))
        assert extended is not None  # locked and leased above
        return extended

    async def lease_sweeper(self, stop: asyncio.Event) -> None:
        gauges_at = 0.0
        while not stop.is_set():
            try:
                async with self.pool.acquire() as conn:
                    ended = await repo.expire_leases(conn)
                    await workforce_repo.expire_gold(conn)
                    # The queue gauges count every open task: at a million that is a scan, so they
                    # are refreshed on their own, slower clock.
                    if time.monotonic() - gauges_at >= self._settings.gauge_seconds:
                        gauges_at = time.monotonic()
                        depth = await workforce_repo.queue_depth_by_pool(conn)
                        QUEUE.clear()
                        OLDEST.clear()
                        for pool_id, state, n, oldest in depth:
                            QUEUE.labels(pool_id or "none", state).set(n)
                            if state == "open":
                                OLDEST.labels(pool_id or "none").set(oldest)
                requeued, withdrawn = ended.get(State.OPEN, 0), ended.get(State.WITHDRAWN, 0)
                if requeued or withdrawn:
                    EXPIRED.inc(requeued + withdrawn)
                    WITHDRAWN.inc(withdrawn)
                    log.info(
                        "expired leases: %d tasks back in the queue, %d withdrawn meanwhile",
                        requeued,
                        withdrawn,
                    )
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("lease sweep failed; retrying", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._settings.lease_sweep_seconds)


async def _pool_of(conn: asyncpg.Connection, annotator_id: str) -> str:
    pool_id: str | None = await conn.fetchval(
        "SELECT pool_id FROM review.annotators WHERE annotator_id = $1", annotator_id
    )
    return pool_id or ""


async def _lock(conn: asyncpg.Connection, task_id: str) -> tuple[Task, datetime]:
    locked = await repo.lock_task(conn, task_id)
    if locked is None:
        raise Refused(Reason.NO_TASK, f"no task {task_id}")
    return locked


def _human_label(
    task: Task, annotator_id: str, label: str, seconds: float, labeled_at: datetime, pool_id: str
) -> labels_pb2.HumanLabel:
    return labels_pb2.HumanLabel(
        item_id=task.item_id,
        task_id=task.task_id,
        label=label,
        annotator_id=annotator_id,
        seconds_spent=seconds,
        labeled_unix_ms=int(labeled_at.timestamp() * 1000),
        reason=task.reason,
        pool_id=pool_id,
        # Always the model's label, even when the person was not shown it: an audit is then
        # scored against it in the export's quality report.
        suggested_label=task.suggested_label,
        suggested_confidence=task.confidence if task.suggested_label else 0.0,
    )


def _human_batch(task: Task, label: labels_pb2.HumanLabel, msg_id: str) -> Outgoing:
    return Outgoing(
        msg_id, labels_pb2.HumanLabelBatch(batch_id=msg_id, project_id=task.project_id, labels=[label])
    )


def _final_batch(
    project_id: str, item_id: str, settled: Settled, people: Sequence[str], ms: int, *, batch_id: str
) -> labels_pb2.FinalLabelBatch:
    source = labels_pb2.LABEL_SOURCE_CONSENSUS if len(people) > 1 else labels_pb2.LABEL_SOURCE_HUMAN
    return labels_pb2.FinalLabelBatch(
        batch_id=batch_id,
        project_id=project_id,
        labels=[
            labels_pb2.FinalLabel(
                item_id=item_id,
                label=settled.label,
                source=source,
                confidence=settled.posterior,
                annotator_ids=list(people),
                finalized_unix_ms=ms,
                method=settled.method,
            )
        ],
    )


def _label_messages(task: Task, human: labels_pb2.HumanLabel) -> list[Outgoing]:
    """One person's label on an item nobody else labels: the human label for the scorer and, for a
    first label, the final label (a second opinion is settled by the scorer, which knows the
    first label and the model's)."""
    outgoing = [_human_batch(task, human, f"annotated:{task.task_id}")]
    if task.round == 0:
        settled = Settled(human.label, 1.0, "single")
        final = _final_batch(
            task.project_id,
            task.item_id,
            settled,
            [human.annotator_id],
            human.labeled_unix_ms,
            batch_id=task.task_id,
        )
        outgoing.append(Outgoing(f"final:human:{task.task_id}", final))
    return outgoing


def _consensus_messages(task: Task, settled: Settled, people: Sequence[str], ms: int) -> list[Outgoing]:
    """The aggregate: for the scorer, one human label weighted by its posterior; for the export,
    the final label."""
    human = labels_pb2.HumanLabel(
        item_id=task.item_id,
        task_id=task.task_id,
        label=settled.label,
        annotator_id=people[0],
        labeled_unix_ms=ms,
        reason=task.reason,
        weight=settled.posterior,
        annotator_ids=list(people),
    )
    final = _final_batch(
        task.project_id, task.item_id, settled, people, ms, batch_id=f"consensus:{task.item_id}"
    )
    return [
        _human_batch(task, human, f"annotated:consensus:{task.item_id}"),
        Outgoing(f"final:consensus:{task.item_id}", final),
    ]


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
    Reason.PAUSED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.NOT_IN_POOL: grpc.StatusCode.PERMISSION_DENIED,
    Reason.AT_CAPACITY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.POOL_AT_CAPACITY: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


WORKER_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_BATCH = 500


class ReviewServicer(review_pb2_grpc.ReviewServiceServicer):
    """The annotator is always the caller (the interceptor resolved their token); for the vendor
    API, the vendor's worker "<pool>/<worker_id>"."""

    def __init__(self, desk: ReviewDesk) -> None:
        self._desk = desk

    async def NextTask(self, request: review_pb2.NextTaskRequest, context: Context) -> review_pb2.Task:
        try:
            task = await self._desk.claim(
                request.project_id,
                caller().user_id,
                request.lease_seconds,
                second_opinions_only=request.second_opinions_only,
                include_skipped=request.include_skipped,
            )
        except Refused as exc:
            await context.abort(STATUS_OF[exc.reason], exc.message)
        if task is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no task waiting for you in this project")
        return await self._desk.task_message(task)

    async def SubmitLabel(
        self, request: review_pb2.SubmitLabelRequest, context: Context
    ) -> review_pb2.SubmitLabelResponse:
        await _check_task_id(request.task_id, context)
        try:
            accepted = await self._desk.submit(
                request.task_id, request.lease_id, request.label, request.seconds_spent, caller().user_id
            )
        except Refused as exc:
            await context.abort(STATUS_OF[exc.reason], exc.message)
        return review_pb2.SubmitLabelResponse(accepted=accepted)

    async def SkipTask(
        self, request: review_pb2.SkipTaskRequest, context: Context
    ) -> review_pb2.SkipTaskResponse:
        await _check_task_id(request.task_id, context)
        try:
            await self._desk.skip(
                request.task_id, request.lease_id, request.reason, request.release, caller().user_id
            )
        except Refused as exc:
            await context.abort(STATUS_OF[exc.reason], exc.message)
        return review_pb2.SkipTaskResponse()

    async def ExtendLease(self, request: review_pb2.ExtendLeaseRequest, context: Context) -> review_pb2.Task:
        await _check_task_id(request.task_id, context)
        try:
            extended = await self._desk.extend(
                request.task_id, request.lease_id, request.lease_seconds, caller().user_id
            )
        except Refused as exc:
            await context.abort(STATUS_OF[exc.reason], exc.message)
        return await self._desk.task_message(extended)

    async def _vendor_pool(self, context: Context) -> str:
        async with self._desk.pool.acquire() as conn:
            pool_id = await workforce_repo.vendor_pool(conn, caller().user_id)
        if pool_id is None:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{caller().user_id} is the vendor account of no pool: a manager sets it with PutPool",
            )
        assert pool_id is not None
        return pool_id

    async def ClaimBatch(
        self, request: review_pb2.ClaimBatchRequest, context: Context
    ) -> review_pb2.ClaimBatchResponse:
        if len(request.worker_ids) > MAX_BATCH:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_BATCH} worker ids per call")
        bad = [w for w in request.worker_ids if not WORKER_ID_RE.match(w)]
        if bad:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"worker ids must match {WORKER_ID_RE.pattern}: {bad[:3]}"
            )
        pool_id = await self._vendor_pool(context)
        out = review_pb2.ClaimBatchResponse()
        for worker in request.worker_ids:
            annotator = f"{pool_id}/{worker}"
            async with self._desk.pool.acquire() as conn:
                await workforce_repo.ensure_member(conn, annotator, pool_id)
            try:
                task = await self._desk.claim(
                    request.project_id, annotator, request.lease_seconds, vendor_pool=pool_id
                )
            except Refused as exc:
                if exc.reason is Reason.NOT_IN_POOL:
                    await context.abort(STATUS_OF[exc.reason], exc.message)
                continue  # this worker is paused or at capacity: the others still get work
            if task is None:
                break  # the queue is empty for this pool
            out.tasks.append(
                review_pb2.WorkerTask(worker_id=worker, task=await self._desk.task_message(task))
            )
        return out

    async def SubmitBatch(
        self, request: review_pb2.SubmitBatchRequest, context: Context
    ) -> review_pb2.SubmitBatchResponse:
        if len(request.labels) > MAX_BATCH:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_BATCH} labels per call")
        pool_id = await self._vendor_pool(context)
        out = review_pb2.SubmitBatchResponse()
        for lb in request.labels:
            result = review_pb2.WorkerLabelResult(task_id=lb.task_id)
            try:
                uuid.UUID(lb.task_id)
                if not WORKER_ID_RE.match(lb.worker_id):
                    raise ValueError(f"worker id {lb.worker_id!r} is not valid")
                result.accepted = await self._desk.submit(
                    lb.task_id, lb.lease_id, lb.label, lb.seconds_spent, f"{pool_id}/{lb.worker_id}"
                )
            except Refused as exc:
                result.error = f"{exc.reason}: {exc.message}"
            except ValueError as exc:
                result.error = f"invalid: {exc}"
            out.results.append(result)
        return out


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
