"""The review service against real servers: leases, expiry, once-only labels, withdrawal."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import nats
import pytest

from services.cli.client import Clients
from services.cli.stack import Stack
from services.common.bus.contracts import Subject
from services.common.bus.topology import apply_topology
from services.common.projects import LabelSpec, ProjectDirectory, ProjectSpec
from services.gen.tandem.labels.v1 import labels_pb2
from services.gen.tandem.review.v1 import review_pb2
from services.gen.tandem.tasks.v1 import tasks_pb2

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PROJECT = ProjectSpec("rv", "rv", (LabelSpec("yes", ""), LabelSpec("no", "")), "", 0.95, 0.0)


@pytest.fixture
async def review(tmp_path: Path, nats_url: str, database_url: str) -> AsyncIterator[tuple[Stack, Clients]]:
    nc = await nats.connect(nats_url)
    await apply_topology(nc.jetstream())
    await ProjectDirectory(nc.jetstream()).put(PROJECT)
    await nc.close()
    stack = Stack(
        tmp_path / "state",
        nats_url=nats_url,
        database_url=database_url,
        services=("review",),
        extra_env={"TANDEM_REVIEW_LEASE_SWEEP_SECONDS": "0.2"},
    )
    await asyncio.to_thread(stack.start)
    targets = {
        name: stack.processes["review"].grpc_target for name in ("ingest", "review", "export", "scorer")
    }
    try:
        async with Clients(targets) as clients:
            yield stack, clients
    finally:
        await asyncio.to_thread(stack.stop)


async def _publish(stack: Stack, message: tasks_pb2.ReviewTaskBatch | tasks_pb2.TaskWithdrawalBatch) -> None:
    nc = await nats.connect(stack.nats_url)
    subject = (
        Subject.TASKS_REVIEW_REQUESTED
        if isinstance(message, tasks_pb2.ReviewTaskBatch)
        else Subject.TASKS_WITHDRAWN
    )
    await nc.jetstream().publish(str(subject), message.SerializeToString())
    await nc.close()


def _tasks(*priorities: float) -> tuple[list[str], tasks_pb2.ReviewTaskBatch]:
    ids = [str(uuid.uuid4()) for _ in priorities]
    batch = tasks_pb2.ReviewTaskBatch(
        batch_id=str(uuid.uuid4()),
        project_id=PROJECT.project_id,
        tasks=[
            tasks_pb2.ReviewTask(
                item_id=i, project_id="rv", external_id=f"ext-{n}", text=f"text {n}", priority=p
            )
            for n, (i, p) in enumerate(zip(ids, priorities, strict=True))
        ],
    )
    return ids, batch


async def _next(clients: Clients, who: str, lease: float = 0.0) -> review_pb2.Task:
    deadline = time.monotonic() + 20
    while True:
        try:
            return await clients.review.NextTask(
                review_pb2.NextTaskRequest(project_id="rv", annotator_id=who, lease_seconds=lease), timeout=5
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_tasks_are_served_by_priority_and_labeled_once(review: tuple[Stack, Clients]) -> None:
    stack, clients = review
    ids, batch = _tasks(0.1, 0.9, 0.5)
    await _publish(stack, batch)
    first = await _next(clients, "ann-1")
    second = await _next(clients, "ann-2")
    assert [first.item_id, second.item_id] == [ids[1], ids[2]]
    assert list(first.labels) == ["yes", "no"] and first.lease_id

    with pytest.raises(grpc.aio.AioRpcError) as wrong_label:
        await clients.review.SubmitLabel(
            review_pb2.SubmitLabelRequest(
                task_id=first.task_id, lease_id=first.lease_id, annotator_id="ann-1", label="maybe"
            )
        )
    assert wrong_label.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    with pytest.raises(grpc.aio.AioRpcError) as not_yours:
        await clients.review.SubmitLabel(
            review_pb2.SubmitLabelRequest(
                task_id=first.task_id, lease_id=second.lease_id, annotator_id="ann-2", label="no"
            )
        )
    assert not_yours.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    submit = review_pb2.SubmitLabelRequest(
        task_id=first.task_id, lease_id=first.lease_id, annotator_id="ann-1", label="yes"
    )
    assert (await clients.review.SubmitLabel(submit)).accepted
    # A retried submit is answered, not recorded twice.
    assert not (await clients.review.SubmitLabel(submit)).accepted

    nc = await nats.connect(stack.nats_url)
    try:
        js = nc.jetstream()
        sub = await js.subscribe(str(Subject.LABELS_FINALIZED), stream="TANDEM_LABELS")
        msg = await sub.next_msg(timeout=10)
        final = labels_pb2.FinalLabelBatch.FromString(msg.data)
        assert [(f.item_id, f.label, f.source) for f in final.labels] == [
            (ids[1], "yes", labels_pb2.LABEL_SOURCE_HUMAN)
        ]
        with pytest.raises(nats.errors.TimeoutError):
            await sub.next_msg(timeout=1)  # exactly one final label for one submit
    finally:
        await nc.close()


async def test_expired_and_skipped_leases_return_to_the_queue(review: tuple[Stack, Clients]) -> None:
    stack, clients = review
    ids, batch = _tasks(0.9, 0.1)
    await _publish(stack, batch)
    leased = await _next(clients, "slow", lease=0.5)
    assert leased.item_id == ids[0]
    await asyncio.sleep(1.0)  # the lease expires; the sweeper puts the task back
    again = await _next(clients, "fast")
    assert again.item_id == ids[0] and again.lease_id != leased.lease_id
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await clients.review.SubmitLabel(
            review_pb2.SubmitLabelRequest(
                task_id=leased.task_id, lease_id=leased.lease_id, annotator_id="slow", label="no"
            )
        )
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    await clients.review.SkipTask(
        review_pb2.SkipTaskRequest(task_id=again.task_id, lease_id=again.lease_id, annotator_id="fast")
    )
    assert (await _next(clients, "third")).item_id == ids[0]


async def test_withdrawal_removes_open_tasks_but_not_leased_ones(review: tuple[Stack, Clients]) -> None:
    stack, clients = review
    ids, batch = _tasks(0.9, 0.5, 0.1)
    await _publish(stack, batch)
    leased = await _next(clients, "ann")
    assert leased.item_id == ids[0]
    await _publish(
        stack, tasks_pb2.TaskWithdrawalBatch(batch_id="w1", project_id="rv", item_ids=[ids[0], ids[1]])
    )
    await asyncio.sleep(1.0)
    remaining = await _next(clients, "ann-2")
    assert remaining.item_id == ids[2]  # ids[1] was withdrawn while open
    # The leased task was kept: its label still counts.
    ok = await clients.review.SubmitLabel(
        review_pb2.SubmitLabelRequest(
            task_id=leased.task_id, lease_id=leased.lease_id, annotator_id="ann", label="no"
        )
    )
    assert ok.accepted
    stats = await clients.stats("rv")
    assert (stats.review.withdrawn, stats.review.done, stats.review.leased) == (1, 1, 1)
