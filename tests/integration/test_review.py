"""The review service against real servers: who may take and label a task, leases and their
expiry, once-only labels, second opinions, withdrawal in any order, tokens."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path

import asyncpg
import grpc
import nats
import pytest
from nats.js import JetStreamContext

from services.cli.client import Clients, channel
from services.cli.stack import Stack
from services.common.auth import Role, token_digest
from services.common.bus.contracts import Subject
from services.common.bus.topology import apply_topology
from services.common.projects import LabelSpec, ProjectDirectory, ProjectSpec
from services.gen.tandem.labels.v1 import labels_pb2
from services.gen.tandem.review.v1 import review_pb2
from services.gen.tandem.stats.v1 import stats_pb2, stats_pb2_grpc
from services.gen.tandem.tasks.v1 import tasks_pb2
from services.identity.bucket import IdentityBucket
from services.review import repo
from services.review.repo import task_id

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PROJECT = ProjectSpec("rv", "rv", (LabelSpec("yes", ""), LabelSpec("no", "")), "", 0.95, 0.0)
OTHER = ProjectSpec("other", "other", (LabelSpec("a", ""), LabelSpec("b", "")), "", 0.95, 0.0)


class Review:
    """The running review service, and people calling it with their own tokens."""

    def __init__(self, stack: Stack, js: JetStreamContext) -> None:
        self.stack = stack
        self.js = js
        self.identity = IdentityBucket(js)
        target = stack.processes["review"].grpc_target
        self._targets = {name: target for name in ("ingest", "review", "export", "scorer")}
        self._open: list[Clients] = []
        self._watcher: grpc.aio.Channel | None = None

    def connect(self, token: str | None) -> Clients:
        clients = Clients(self._targets, token=token)
        self._open.append(clients)
        return clients

    async def person(
        self, user_id: str, projects: Iterable[str] = ("rv",), role: Role = Role.ANNOTATOR
    ) -> tuple[Clients, str]:
        token = await self.identity.issue(user_id, role, projects)
        return self.connect(token), token

    async def stats_until(self, until: Callable[[stats_pb2.ReviewStats], bool]) -> stats_pb2.ReviewStats:
        """The project's review counts, once `until` holds (the bus and the sweeper run on their
        own). Read by an onlooker, through one call, so each answer is one moment's counts."""
        if self._watcher is None:
            token = await self.identity.issue("onlooker", Role.VIEWER, ["rv"])
            self._watcher = channel(self._targets["review"], token)
        stub = stats_pb2_grpc.StatsServiceStub(self._watcher)
        deadline = time.monotonic() + 10
        while True:
            stats = (await stub.GetProjectStats(stats_pb2.GetProjectStatsRequest(project_id="rv"))).review
            if until(stats):
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"review stats never reached the expected state: {stats}")
            await asyncio.sleep(0.1)

    async def publish(self, message: tasks_pb2.ReviewTaskBatch | tasks_pb2.TaskWithdrawalBatch) -> None:
        subject = (
            Subject.TASKS_REVIEW_REQUESTED
            if isinstance(message, tasks_pb2.ReviewTaskBatch)
            else Subject.TASKS_WITHDRAWN
        )
        await self.js.publish(str(subject), message.SerializeToString())

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._open))
        if self._watcher is not None:
            await self._watcher.close(None)


@pytest.fixture
async def review(
    tmp_path: Path, nats_url: str, js: JetStreamContext, database_url: str
) -> AsyncIterator[Review]:
    await apply_topology(js)
    projects = ProjectDirectory(js)
    await projects.put(PROJECT)
    await projects.put(OTHER)
    stack = Stack(
        tmp_path / "state",
        nats_url=nats_url,
        database_url=database_url,
        services=("review",),
        extra_env={"TANDEM_REVIEW_LEASE_SWEEP_SECONDS": "0.2"},
    )
    await asyncio.to_thread(stack.start)
    desk = Review(stack, js)
    try:
        yield desk
    finally:
        await desk.close()
        await asyncio.to_thread(stack.stop)


def _task(item_id: str, priority: float, round_: int = 0, n: int = 0) -> tasks_pb2.ReviewTask:
    return tasks_pb2.ReviewTask(
        item_id=item_id,
        project_id="rv",
        external_id=f"ext-{n}",
        text=f"text {n}",
        priority=priority,
        round=round_,
    )


def _tasks(*priorities: float) -> tuple[list[str], tasks_pb2.ReviewTaskBatch]:
    ids = [str(uuid.uuid4()) for _ in priorities]
    return ids, _batch(*(_task(i, p, n=n) for n, (i, p) in enumerate(zip(ids, priorities, strict=True))))


def _batch(*tasks: tasks_pb2.ReviewTask) -> tasks_pb2.ReviewTaskBatch:
    return tasks_pb2.ReviewTaskBatch(batch_id=str(uuid.uuid4()), project_id="rv", tasks=tasks)


def _withdrawal(*item_ids: str) -> tasks_pb2.TaskWithdrawalBatch:
    return tasks_pb2.TaskWithdrawalBatch(batch_id=str(uuid.uuid4()), project_id="rv", item_ids=item_ids)


async def _next(
    clients: Clients, lease: float = 0.0, project: str = "rv", second_opinions_only: bool = False
) -> review_pb2.Task:
    """The caller's next task, waiting for published tasks to reach the service."""
    deadline = time.monotonic() + 20
    request = review_pb2.NextTaskRequest(
        project_id=project, lease_seconds=lease, second_opinions_only=second_opinions_only
    )
    while True:
        try:
            return await clients.review.NextTask(request, timeout=5)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def _refused(call: Awaitable[object]) -> grpc.StatusCode:
    """The status a call fails with (the test fails if it succeeds)."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    assert refused.value.details()  # refusals say why, in words
    return refused.value.code()


def _submit(
    task: review_pb2.Task, label: str = "yes", lease_id: str | None = None
) -> review_pb2.SubmitLabelRequest:
    return review_pb2.SubmitLabelRequest(
        task_id=task.task_id, lease_id=task.lease_id if lease_id is None else lease_id, label=label
    )


async def test_tasks_are_served_by_priority_and_labeled_once(review: Review) -> None:
    ann1, _ = await review.person("ann-1")
    ann2, _ = await review.person("ann-2")
    ids, batch = _tasks(0.1, 0.9, 0.5)
    await review.publish(batch)
    first = await _next(ann1)
    second = await _next(ann2)
    assert [first.item_id, second.item_id] == [ids[1], ids[2]]
    assert list(first.labels) == ["yes", "no"] and first.lease_id

    assert (
        await _refused(ann1.review.SubmitLabel(_submit(first, "maybe"))) == grpc.StatusCode.INVALID_ARGUMENT
    )

    assert (await ann1.review.SubmitLabel(_submit(first))).accepted
    # A retried submit is answered, not recorded twice.
    assert not (await ann1.review.SubmitLabel(_submit(first))).accepted

    sub = await review.js.subscribe(str(Subject.LABELS_FINALIZED), stream="TANDEM_LABELS")
    msg = await sub.next_msg(timeout=10)
    final = labels_pb2.FinalLabelBatch.FromString(msg.data)
    assert [(f.item_id, f.label, f.source, list(f.annotator_ids)) for f in final.labels] == [
        (ids[1], "yes", labels_pb2.LABEL_SOURCE_HUMAN, ["ann-1"])
    ]
    with pytest.raises(nats.errors.TimeoutError):
        await sub.next_msg(timeout=1)  # exactly one final label for one submit
    await sub.unsubscribe()


async def test_every_call_needs_a_live_token_and_the_project(review: Review) -> None:
    member, token = await review.person("member")
    outsider, _ = await review.person("outsider", projects=["other"])
    viewer, _ = await review.person("viewer", role=Role.VIEWER)
    _, batch = _tasks(0.9, 0.1)
    await review.publish(batch)
    await review.stats_until(lambda s: s.open == 2)
    next_task = review_pb2.NextTaskRequest(project_id="rv")
    assert await _refused(outsider.review.NextTask(next_task)) == grpc.StatusCode.PERMISSION_DENIED
    assert await _refused(viewer.review.NextTask(next_task)) == grpc.StatusCode.PERMISSION_DENIED
    task = await _next(member)

    for clients in (review.connect(None), review.connect("tdm_not-a-token")):
        assert await _refused(clients.review.NextTask(next_task)) == grpc.StatusCode.UNAUTHENTICATED
        # Even with a real lease in hand.
        assert await _refused(clients.review.SubmitLabel(_submit(task))) == grpc.StatusCode.UNAUTHENTICATED

    # Revoked: refused from the very next call on.
    await review.identity.drop_grant_digest(token_digest(token))
    assert await _refused(member.review.SubmitLabel(_submit(task))) == grpc.StatusCode.UNAUTHENTICATED
    assert await _refused(member.review.NextTask(next_task)) == grpc.StatusCode.UNAUTHENTICATED
    # The lease is the person's, not the token's: a new token of theirs may still label.
    again, _ = await review.person("member")
    assert (await again.review.SubmitLabel(_submit(task))).accepted
    stats = await review.stats_until(lambda s: s.done == 1)
    assert (stats.open, stats.leased) == (1, 0)


async def test_only_the_current_lease_holder_labels_skips_or_extends(review: Review) -> None:
    ann1, _ = await review.person("ann-1")
    ann2, _ = await review.person("ann-2")
    ids, batch = _tasks(0.9, 0.1)
    await review.publish(batch)
    held = await _next(ann1)
    assert held.item_id == ids[0]
    # An open task: nobody holds it, whatever lease id comes with the label.
    open_id = task_id(ids[1], 0)
    for lease_id in ("", str(uuid.uuid4()), held.lease_id):
        request = review_pb2.SubmitLabelRequest(task_id=open_id, lease_id=lease_id, label="yes")
        assert await _refused(ann2.review.SubmitLabel(request)) == grpc.StatusCode.FAILED_PRECONDITION

    # ann-1's task, with ann-1's own lease id: still not ann-2's.
    assert await _refused(ann2.review.SubmitLabel(_submit(held))) == grpc.StatusCode.FAILED_PRECONDITION
    skip = review_pb2.SkipTaskRequest(task_id=held.task_id, lease_id=held.lease_id)
    assert await _refused(ann2.review.SkipTask(skip)) == grpc.StatusCode.FAILED_PRECONDITION
    extend = review_pb2.ExtendLeaseRequest(task_id=held.task_id, lease_id=held.lease_id, lease_seconds=600)
    assert await _refused(ann2.review.ExtendLease(extend)) == grpc.StatusCode.FAILED_PRECONDITION
    # ann-1, with a lease id that is not the current one.
    stale = _submit(held, lease_id=str(uuid.uuid4()))
    assert await _refused(ann1.review.SubmitLabel(stale)) == grpc.StatusCode.FAILED_PRECONDITION
    stats = await review.stats_until(lambda s: s.leased == 1)
    assert (stats.open, stats.done) == (1, 0)  # none of that changed anything
    extended = await ann1.review.ExtendLease(extend)
    assert extended.lease_id == held.lease_id and extended.lease_expires_unix_ms > held.lease_expires_unix_ms

    assert (await ann1.review.SubmitLabel(_submit(held))).accepted
    # Done: a retry by its labeler is answered, anyone else is refused.
    assert not (await ann1.review.SubmitLabel(_submit(held))).accepted
    assert await _refused(ann2.review.SubmitLabel(_submit(held))) == grpc.StatusCode.FAILED_PRECONDITION
    stats = await review.stats_until(lambda s: s.done == 1)
    assert (stats.open, stats.leased, stats.annotators) == (1, 0, 1)


async def test_expired_and_skipped_leases_return_to_the_queue(review: Review) -> None:
    slow, _ = await review.person("slow")
    fast, _ = await review.person("fast")
    third, _ = await review.person("third")
    ids, batch = _tasks(0.9, 0.1)
    await review.publish(batch)
    leased = await _next(slow, lease=0.5)
    assert leased.item_id == ids[0]
    # The lease expires; the sweeper puts the task back.
    await review.stats_until(lambda s: s.open == 2 and s.leased == 0)
    again = await _next(fast)
    assert again.item_id == ids[0] and again.lease_id != leased.lease_id
    assert (
        await _refused(slow.review.SubmitLabel(_submit(leased, "no"))) == grpc.StatusCode.FAILED_PRECONDITION
    )

    await fast.review.SkipTask(review_pb2.SkipTaskRequest(task_id=again.task_id, lease_id=again.lease_id))
    assert (await _next(third)).item_id == ids[0]


async def _served(call: Awaitable[review_pb2.Task]) -> review_pb2.Task:
    return await call


async def test_a_re_rank_in_progress_does_not_empty_the_queue(review: Review) -> None:
    ann, _ = await review.person("ann")
    ids, batch = _tasks(0.5, 0.4)
    await review.publish(batch)
    await review.stats_until(lambda s: s.open == 2)
    conn = await asyncpg.connect(review.stack.database_url)
    try:
        # A re-rank of every open task, not yet committed, holds their row locks…
        rerank = conn.transaction()
        await rerank.start()
        await repo.upsert_tasks(conn, [], [repo.Rerank(ids[0], 0.1, ""), repo.Rerank(ids[1], 0.9, "")])
        claim = asyncio.ensure_future(
            _served(ann.review.NextTask(review_pb2.NextTaskRequest(project_id="rv"), timeout=10))
        )
        await asyncio.sleep(0.5)
        await rerank.commit()
        # …and the person waits for it instead of hearing that nothing is waiting; served by the
        # order it set.
        assert (await claim).item_id == ids[1]
    finally:
        await conn.close()


async def test_withdrawal_removes_open_tasks_but_not_leased_ones(review: Review) -> None:
    ann, _ = await review.person("ann")
    ann2, _ = await review.person("ann-2")
    ids, batch = _tasks(0.9, 0.5, 0.1)
    await review.publish(batch)
    leased = await _next(ann)
    assert leased.item_id == ids[0]
    await review.publish(_withdrawal(ids[0], ids[1]))
    await review.stats_until(lambda s: s.withdrawn == 1)
    remaining = await _next(ann2)
    assert remaining.item_id == ids[2]  # ids[1] was withdrawn while open
    # The leased task was kept: its label still counts.
    assert (await ann.review.SubmitLabel(_submit(leased, "no"))).accepted
    stats = await review.stats_until(lambda s: s.done == 1)
    assert (stats.withdrawn, stats.done, stats.leased) == (1, 1, 1)


async def test_a_withdrawn_task_whose_lease_ends_does_not_come_back(review: Review) -> None:
    expires, _ = await review.person("expires")
    skips, _ = await review.person("skips")
    later, _ = await review.person("later")
    ids, batch = _tasks(0.9, 0.5, 0.1)
    await review.publish(batch)
    a = await _next(expires, lease=60)
    b = await _next(skips, lease=60)
    assert [a.item_id, b.item_id] == ids[:2]
    # ids[2], still open, shows when the withdrawal has been taken in.
    await review.publish(_withdrawal(*ids))
    stats = await review.stats_until(lambda s: s.withdrawn == 1)
    assert (stats.leased, stats.open) == (2, 0)  # both leases outlived the withdrawal

    await skips.review.SkipTask(review_pb2.SkipTaskRequest(task_id=b.task_id, lease_id=b.lease_id))
    stats = await review.stats_until(lambda s: s.leased == 1)
    assert (stats.open, stats.withdrawn) == (0, 2)
    # The holder may still extend (and label); here the lease is cut short and runs out.
    await expires.review.ExtendLease(
        review_pb2.ExtendLeaseRequest(task_id=a.task_id, lease_id=a.lease_id, lease_seconds=0.2)
    )
    stats = await review.stats_until(lambda s: s.leased == 0)
    assert (stats.open, stats.withdrawn) == (0, 3)
    assert await _refused(later.review.NextTask(review_pb2.NextTaskRequest(project_id="rv"))) == (
        grpc.StatusCode.NOT_FOUND
    )
    assert await _refused(expires.review.SubmitLabel(_submit(a))) == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_withdrawal_before_its_task_sticks(review: Review) -> None:
    ann, _ = await review.person("ann")
    early, kept = str(uuid.uuid4()), str(uuid.uuid4())
    await review.publish(_withdrawal(early))
    await review.publish(_batch(_task(early, 0.9, n=0), _task(kept, 0.1, n=1)))
    # The same stream, in order: once `kept` is served, `early` has been taken in too.
    assert (await _next(ann)).item_id == kept
    stats = await review.stats_until(lambda s: s.leased == 1)
    assert (stats.open, stats.withdrawn) == (0, 1)
    # A redelivered request changes nothing.
    other = str(uuid.uuid4())
    await review.publish(_batch(_task(early, 0.9, n=0), _task(other, 0.1, n=2)))
    assert (await _next(ann)).item_id == other
    assert await _refused(ann.review.NextTask(review_pb2.NextTaskRequest(project_id="rv"))) == (
        grpc.StatusCode.NOT_FOUND
    )
    stats = await review.stats_until(lambda s: s.leased == 2)
    assert (stats.open, stats.withdrawn) == (0, 1)


async def test_nobody_gives_the_second_opinion_on_their_own_label(review: Review) -> None:
    first, _ = await review.person("first")
    second, _ = await review.person("second")
    # Item x: first labels round 0, then its second opinion is asked for.
    x = str(uuid.uuid4())
    await review.publish(_batch(_task(x, 0.5)))
    x0 = await _next(first)
    assert (await first.review.SubmitLabel(_submit(x0))).accepted
    await review.publish(_batch(_task(x, 0.9, round_=1)))
    await review.stats_until(lambda s: s.open == 1)
    code = await _refused(first.review.NextTask(review_pb2.NextTaskRequest(project_id="rv")))
    assert code == grpc.StatusCode.NOT_FOUND  # the only open task is not for them
    x1 = await _next(second)
    assert (x1.item_id, x1.round) == (x, 1)
    assert (await second.review.SubmitLabel(_submit(x1, "no"))).accepted

    # Item y: both rounds wait at once. Holding one task of an item, nobody is handed another.
    y = str(uuid.uuid4())
    await review.publish(_batch(_task(y, 0.9, round_=1), _task(y, 0.5)))
    await review.stats_until(lambda s: s.open == 2)
    y1 = await _next(first)
    assert (y1.item_id, y1.round) == (y, 1)
    code = await _refused(first.review.NextTask(review_pb2.NextTaskRequest(project_id="rv")))
    assert code == grpc.StatusCode.NOT_FOUND
    y0 = await _next(second)
    assert (y0.item_id, y0.round) == (y, 0)
    assert (await second.review.SubmitLabel(_submit(y0))).accepted

    # Item z: the same, with both claims sent at once: one person's claims run one after the
    # other, so the second sees the first's lease.
    z = str(uuid.uuid4())
    await review.publish(_batch(_task(z, 0.9, round_=1), _task(z, 0.5)))
    await review.stats_until(lambda s: s.open == 2)
    answers = await asyncio.gather(
        first.review.NextTask(review_pb2.NextTaskRequest(project_id="rv")),
        first.review.NextTask(review_pb2.NextTaskRequest(project_id="rv")),
        return_exceptions=True,
    )
    got = [a for a in answers if isinstance(a, review_pb2.Task)]
    refused = [a.code() for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    assert (len(got), refused) == (1, [grpc.StatusCode.NOT_FOUND]), answers
    assert got[0].item_id == z

    stats = await review.stats_until(lambda s: s.done == 3)
    assert (stats.open, stats.leased, stats.done) == (1, 2, 3)


async def test_a_skipped_task_goes_to_others_not_back_to_the_skipper(review: Review) -> None:
    ann, _ = await review.person("ann")
    bob, _ = await review.person("bob")
    ids, batch = _tasks(0.9, 0.5)
    await review.publish(batch)
    first = await _next(ann)
    assert first.item_id == ids[0]
    await ann.review.SkipTask(review_pb2.SkipTaskRequest(task_id=first.task_id, lease_id=first.lease_id))
    # The skipper gets the next task, not the one they skipped, although it ranks first…
    after = await _next(ann)
    assert after.item_id == ids[1]
    await ann.review.SubmitLabel(_submit(after))
    assert await _refused(ann.review.NextTask(review_pb2.NextTaskRequest(project_id="rv"))) == (
        grpc.StatusCode.NOT_FOUND
    )
    # …unless they ask for their skipped tasks back; someone else gets it anyway.
    again = await ann.review.NextTask(review_pb2.NextTaskRequest(project_id="rv", include_skipped=True))
    assert again.item_id == ids[0]
    # Giving a task back (leaving the screen) is not a skip: it may come back to them.
    await ann.review.SkipTask(
        review_pb2.SkipTaskRequest(task_id=again.task_id, lease_id=again.lease_id, release=True)
    )
    assert (await _next(bob)).item_id == ids[0]


async def test_second_opinion_mode_and_hidden_suggestions(review: Review, js: JetStreamContext) -> None:
    reviewer, _ = await review.person("rev", role=Role.REVIEWER)
    first_item, second_item, third_item = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    ordinary = tasks_pb2.ReviewTask(
        item_id=first_item,
        project_id="rv",
        external_id="a",
        text="a",
        priority=0.9,
        suggested_label="yes",
        confidence=0.8,
        reason="uncertain",
    )
    # Another item: nobody holds two tasks of one item at once.
    audit = tasks_pb2.ReviewTask(
        item_id=third_item,
        project_id="rv",
        external_id="b",
        text="b",
        priority=0.5,
        suggested_label="no",
        confidence=0.99,
        reason="audit",
    )
    opinion = tasks_pb2.ReviewTask(
        item_id=second_item,
        project_id="rv",
        external_id="b",
        text="b",
        priority=0.1,
        round=1,
        suggested_label="no",
        confidence=0.99,
        reason="second_opinion",
    )
    await review.publish(_batch(ordinary, audit, opinion))
    # Second-opinion mode skips the more urgent ordinary tasks.
    task = await _next(reviewer, second_opinions_only=True)
    assert task.round == 1 and task.item_id == second_item
    # Blind: second opinions and audits never carry the model's suggestion; ordinary tasks do.
    assert not task.suggested_label and task.confidence == 0
    plain = await _next(reviewer)
    assert plain.reason == "uncertain" and plain.suggested_label == "yes"
    audited = await _next(reviewer)
    assert audited.reason == "audit" and not audited.suggested_label
    # Hidden from the auditor, the model's label still travels with the audit's label, so the
    # export can score the audit against it.
    assert (await reviewer.review.SubmitLabel(_submit(audited, "yes"))).accepted
    sub = await review.js.subscribe(str(Subject.LABELS_ANNOTATED), stream="TANDEM_LABELS")
    try:
        sent = labels_pb2.HumanLabelBatch.FromString((await sub.next_msg(timeout=10)).data)
    finally:
        await sub.unsubscribe()
    assert [(lb.task_id, lb.label, lb.reason, lb.suggested_label) for lb in sent.labels] == [
        (audited.task_id, "yes", "audit", "no")
    ]
    # A project that hides suggestions hides them on every task.
    await ProjectDirectory(js).put(dataclasses.replace(OTHER, hide_suggestions=True))
    ann, _ = await review.person("ann", projects=["other"])
    await review.publish(
        tasks_pb2.ReviewTaskBatch(
            batch_id=str(uuid.uuid4()),
            project_id="other",
            tasks=[
                tasks_pb2.ReviewTask(
                    item_id=str(uuid.uuid4()),
                    project_id="other",
                    external_id="c",
                    text="c",
                    suggested_label="a",
                    confidence=0.7,
                    reason="uncertain",
                )
            ],
        )
    )
    hidden = await _next(ann, project="other")
    assert not hidden.suggested_label and hidden.confidence == 0


async def test_tasks_name_their_own_project(review: Review) -> None:
    """A batch without a project of its own: each task is routed by the project it names."""
    ann, _ = await review.person("ann")
    item = str(uuid.uuid4())
    await review.publish(tasks_pb2.ReviewTaskBatch(batch_id=str(uuid.uuid4()), tasks=[_task(item, 0.5)]))
    assert (await _next(ann)).item_id == item
