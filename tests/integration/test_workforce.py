"""Workforces on the real review service: pools and their shares, skills, capacity under
concurrent claims, one item per person, the SLA, dynamic overlap and consensus, gold questions
that pause a bad annotator, and a vendor that sees only its pool."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from nats.js import JetStreamContext

from services.cli.client import Clients
from services.cli.stack import Stack
from services.common.auth import Role
from services.common.bus.contracts import Subject
from services.common.bus.topology import apply_topology
from services.common.projects import LabelSpec, ProjectDirectory, ProjectSpec
from services.gen.tandem.items.v1 import items_pb2
from services.gen.tandem.labels.v1 import labels_pb2
from services.gen.tandem.review.v1 import review_pb2
from services.gen.tandem.tasks.v1 import tasks_pb2
from services.gen.tandem.workforce.v1 import workforce_pb2
from services.identity.bucket import IdentityBucket

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

LABELS = (LabelSpec("yes", ""), LabelSpec("no", ""))


def _project(project_id: str, **workforce: Any) -> ProjectSpec:
    return dataclasses.replace(ProjectSpec(project_id, project_id, LABELS, "", 0.95, 0.0), **workforce)


class Desk:
    def __init__(self, stack: Stack, js: JetStreamContext) -> None:
        self.js = js
        self.identity = IdentityBucket(js)
        target = stack.processes["review"].grpc_target
        self._targets = {name: target for name in ("ingest", "review", "export", "scorer")}
        self._open: list[Clients] = []
        self.projects = ProjectDirectory(js)

    async def person(self, user_id: str, projects: Sequence[str], role: Role = Role.ANNOTATOR) -> Clients:
        clients = Clients(self._targets, token=await self.identity.issue(user_id, role, projects))
        self._open.append(clients)
        return clients

    async def tasks(self, project_id: str, items: Sequence[str], confidence: float = 0.9) -> None:
        batch = tasks_pb2.ReviewTaskBatch(
            batch_id=str(uuid.uuid4()),
            project_id=project_id,
            tasks=[
                tasks_pb2.ReviewTask(
                    item_id=i,
                    project_id=project_id,
                    external_id=f"e{n}",
                    text=f"text {n}",
                    priority=0.5,
                    confidence=confidence,
                    reason="uncertain",
                    suggested_label="yes",
                )
                for n, i in enumerate(items)
            ],
        )
        await self.js.publish(str(Subject.TASKS_REVIEW_REQUESTED), batch.SerializeToString())

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._open))


@pytest.fixture
async def desk(tmp_path: Path, nats_url: str, js: JetStreamContext, database_url: str) -> AsyncIterator[Desk]:
    await apply_topology(js)
    stack = Stack(
        tmp_path / "state",
        nats_url=nats_url,
        database_url=database_url,
        services=("review",),
        extra_env={"TANDEM_REVIEW_LEASE_SWEEP_SECONDS": "0.2", "TANDEM_REVIEW_AGGREGATE_SECONDS": "0.5"},
    )
    await asyncio.to_thread(stack.start)
    d = Desk(stack, js)
    try:
        yield d
    finally:
        await d.close()
        await asyncio.to_thread(stack.stop)


async def _next(clients: Clients, project_id: str) -> review_pb2.Task | None:
    try:
        return await clients.review.NextTask(review_pb2.NextTaskRequest(project_id=project_id), timeout=5)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


async def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call  # type: ignore[misc]
    assert refused.value.details()
    return refused.value.code()


async def _until(check: Callable[[], Awaitable[bool]], seconds: float = 20.0) -> None:
    """Poll: the bus and the service work on their own time."""
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds * 10)):
        if await check():
            return
        await asyncio.sleep(0.1)
        if time.monotonic() > deadline:
            break
    raise AssertionError("condition never held")


async def _open_by_pool(admin: Clients, project_id: str) -> dict[str, int]:
    q = await admin.workforce.GetQuality(workforce_pb2.GetQualityRequest(project_id=project_id))
    return {p.pool_id: p.open for p in q.pools if p.open}


async def test_pool_shares_and_skills_are_respected(desk: Desk) -> None:
    admin = await desk.person("boss", [], Role.ADMIN)
    for pool_id in ("house", "crowd"):
        await admin.workforce.PutPool(workforce_pb2.Pool(pool_id=pool_id, name=pool_id))
    project = _project("pools", pools=(("house", 3.0), ("crowd", 1.0)), skill_fields=("language",))
    await desk.projects.put(project)
    items = [str(uuid.uuid4()) for _ in range(400)]
    german = set(items[:40])
    # The items' metadata arrives on the bus; half of the skills come after their tasks, half before.
    meta = items_pb2.ItemBatch(
        batch_id="b",
        project_id="pools",
        items=[
            items_pb2.Item(
                item_id=i, project_id="pools", text="t", metadata={"language": "de" if i in german else "en"}
            )
            for i in items
        ],
    )
    await desk.tasks("pools", items)
    ack = await desk.js.publish(str(Subject.ITEMS_INGESTED), meta.SerializeToString())

    async def all_routed() -> bool:
        # Routed to pools, and the metadata's skills applied (the consumer acked the batch).
        info = await desk.js.consumer_info("TANDEM_ITEMS", "review-items")
        return (
            info.ack_floor is not None
            and (info.ack_floor.stream_seq or 0) >= ack.seq
            and sum((await _open_by_pool(admin, "pools")).values()) == 400
        )

    await _until(all_routed)
    by_pool = await _open_by_pool(admin, "pools")
    # 3:1 by shares; binomial sd of 400 draws at 0.25 is ~8.7.
    assert 70 <= by_pool["crowd"] <= 130 and by_pool["house"] == 400 - by_pool["crowd"], by_pool

    await admin.workforce.PutAnnotator(
        workforce_pb2.Annotator(annotator_id="en-h", pool_id="house", skills=["language=en"])
    )
    await admin.workforce.PutAnnotator(
        workforce_pb2.Annotator(annotator_id="de-c", pool_id="crowd", skills=["language=de"])
    )
    await admin.workforce.PutAnnotator(workforce_pb2.Annotator(annotator_id="outsider", pool_id=""))
    en_house = await desk.person("en-h", ["pools"])
    de_crowd = await desk.person("de-c", ["pools"])
    outsider = await desk.person("outsider", ["pools"])
    assert await _code(outsider.review.NextTask(review_pb2.NextTaskRequest(project_id="pools"))) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    seen_en: list[str] = []
    for _ in range(8):
        task = await _next(en_house, "pools")
        assert task is not None
        seen_en.append(task.item_id)
        await en_house.review.SubmitLabel(
            review_pb2.SubmitLabelRequest(task_id=task.task_id, lease_id=task.lease_id, label="yes")
        )
    assert not german & set(seen_en)  # needs language=de: never to an English-only person
    task = await _next(de_crowd, "pools")
    assert task is not None and task.item_id in german  # crowd, German: only German crowd items fit

    q = await admin.workforce.GetQuality(workforce_pb2.GetQualityRequest(project_id="pools"))
    leased = {p.pool_id: p.leased for p in q.pools}
    assert leased.get("crowd") == 1 and leased.get("house", 0) == 0


async def test_capacity_is_never_exceeded_under_concurrent_claims(desk: Desk) -> None:
    admin = await desk.person("boss", [], Role.ADMIN)
    await admin.workforce.PutPool(workforce_pb2.Pool(pool_id="small", max_leased=5))
    await desk.projects.put(_project("cap", pools=(("small", 1.0),)))
    await desk.tasks("cap", [str(uuid.uuid4()) for _ in range(60)])
    people = []
    for n in range(4):
        await admin.workforce.PutAnnotator(
            workforce_pb2.Annotator(annotator_id=f"p{n}", pool_id="small", max_leased=2)
        )
        people.append(await desk.person(f"p{n}", ["cap"]))

    async def queued() -> bool:
        return (await _open_by_pool(admin, "cap")).get("small") == 60

    await _until(queued)
    calls = [
        p.review.NextTask(review_pb2.NextTaskRequest(project_id="cap")) for p in people for _ in range(4)
    ]
    answers = await asyncio.gather(*calls, return_exceptions=True)
    got = [a for a in answers if isinstance(a, review_pb2.Task)]
    codes = {a.code() for a in answers if isinstance(a, grpc.aio.AioRpcError)}
    assert len(got) == 5, answers  # the pool's cap, though each person could hold 2 (8 in all)
    assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert len({t.item_id for t in got}) == 5
    q = await admin.workforce.GetQuality(workforce_pb2.GetQualityRequest(project_id="cap"))
    assert max(a.leased for a in q.annotators) <= 2


async def test_sla_serves_the_oldest_first_and_nobody_gets_an_item_twice(desk: Desk) -> None:
    await desk.projects.put(_project("sla", sla_seconds=1.0, overlap=3))
    old = str(uuid.uuid4())
    await desk.tasks("sla", [old], confidence=0.9)
    ann = await desk.person("ann", ["sla"])
    await asyncio.sleep(1.5)
    fresh = [str(uuid.uuid4()) for _ in range(3)]
    batch = tasks_pb2.ReviewTaskBatch(
        batch_id="hi",
        project_id="sla",
        tasks=[
            tasks_pb2.ReviewTask(item_id=i, project_id="sla", external_id=i, text="t", priority=0.99)
            for i in fresh
        ],
    )
    await desk.js.publish(str(Subject.TASKS_REVIEW_REQUESTED), batch.SerializeToString())
    await asyncio.sleep(0.5)
    first = await _next(ann, "sla")
    assert first is not None and first.item_id == old  # past the SLA: ahead of higher priorities
    # Overlap 3: each item has three tasks, but one person gets each item once.
    items = [first.item_id]
    while (task := await _next(ann, "sla")) is not None:
        items.append(task.item_id)
    assert sorted(items) == sorted([old, *fresh])


async def test_disagreement_asks_a_third_person_and_the_aggregate_is_published(desk: Desk) -> None:
    await desk.projects.put(_project("ovl", overlap=2, max_overlap=3))
    item = str(uuid.uuid4())
    sub = await desk.js.subscribe(str(Subject.LABELS_FINALIZED), stream="TANDEM_LABELS")
    await desk.tasks("ovl", [item])
    people = [await desk.person(f"v{n}", ["ovl"]) for n in range(3)]
    await asyncio.sleep(0.5)
    t0, t1 = await _next(people[0], "ovl"), await _next(people[1], "ovl")
    assert t0 is not None and t1 is not None and t0.item_id == t1.item_id == item
    assert await _next(people[2], "ovl") is None  # two people, two tasks
    for person, task, label in ((people[0], t0, "yes"), (people[1], t1, "no")):
        await person.review.SubmitLabel(
            review_pb2.SubmitLabelRequest(task_id=task.task_id, lease_id=task.lease_id, label=label)
        )
    t2 = await _next(people[2], "ovl")  # they disagree: a third person is asked
    assert t2 is not None and t2.item_id == item
    await people[2].review.SubmitLabel(
        review_pb2.SubmitLabelRequest(task_id=t2.task_id, lease_id=t2.lease_id, label="yes")
    )
    final = None
    deadline = time.monotonic() + 10
    while final is None and time.monotonic() < deadline:
        msg = await sub.next_msg(timeout=10)
        batch = labels_pb2.FinalLabelBatch.FromString(msg.data)
        final = next((f for f in batch.labels if f.item_id == item), None)
    assert final is not None
    assert (final.label, final.source, final.method) == (
        "yes",
        labels_pb2.LABEL_SOURCE_CONSENSUS,
        "majority_vote",
    )
    assert sorted(final.annotator_ids) == ["v0", "v1", "v2"] and abs(final.confidence - 2 / 3) < 1e-6
    await sub.unsubscribe()


async def test_gold_pauses_a_bad_annotator(desk: Desk) -> None:
    await desk.projects.put(_project("gold", gold_first=10, gold_first_share=1.0, quality_bar=0.7))
    manager = await desk.person("mgr", ["gold"], Role.MANAGER)
    gold = [workforce_pb2.GoldItem(external_id=f"g{n}", text=f"gold {n}", answer="yes") for n in range(12)]
    added = await manager.workforce.AddGold(workforce_pb2.AddGoldRequest(project_id="gold", items=gold))
    assert added.total == 12
    bad_gold = workforce_pb2.GoldItem(external_id="x", text="x", answer="maybe")
    assert (
        await _code(
            manager.workforce.AddGold(workforce_pb2.AddGoldRequest(project_id="gold", items=[bad_gold]))
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    await desk.tasks("gold", [str(uuid.uuid4()) for _ in range(20)])
    good, bad = await desk.person("good", ["gold"]), await desk.person("bad", ["gold"])
    await asyncio.sleep(0.5)
    answered, paused_with = 0, None
    while answered < 30:
        try:
            task = await bad.review.NextTask(review_pb2.NextTaskRequest(project_id="gold"), timeout=5)
        except grpc.aio.AioRpcError as exc:
            paused_with = exc.code()
            break
        assert task.reason == "audit" and not task.suggested_label  # gold looks like an audit
        await bad.review.SubmitLabel(
            review_pb2.SubmitLabelRequest(task_id=task.task_id, lease_id=task.lease_id, label="no")
        )
        answered += 1
    assert paused_with == grpc.StatusCode.FAILED_PRECONDITION
    assert answered == 5  # paused after 5 wrong gold answers (the first 10 tasks are all gold here)
    for _ in range(8):
        given = await _next(good, "gold")
        assert given is not None
        await good.review.SubmitLabel(
            review_pb2.SubmitLabelRequest(task_id=given.task_id, lease_id=given.lease_id, label="yes")
        )
    q = await manager.workforce.GetQuality(workforce_pb2.GetQualityRequest(project_id="gold"))
    by = {a.annotator_id: a for a in q.annotators}
    assert by["bad"].paused and "gold accuracy" in by["bad"].paused_reason
    assert not by["good"].paused and by["good"].gold_accuracy.value == 1.0
    assert by["bad"].gold_accuracy.high < 0.7


async def test_a_vendor_sees_only_its_pool(desk: Desk) -> None:
    admin = await desk.person("boss", [], Role.ADMIN)
    await admin.workforce.PutPool(workforce_pb2.Pool(pool_id="house"))
    await admin.workforce.PutPool(workforce_pb2.Pool(pool_id="vend", vendor_user_id="acme"))
    await desk.projects.put(_project("vp", pools=(("house", 1.0), ("vend", 1.0))))
    await desk.projects.put(_project("novendor"))
    vendor = await desk.person("acme", ["vp", "novendor"], Role.VENDOR)
    await desk.tasks("vp", [str(uuid.uuid4()) for _ in range(40)])

    async def queued() -> bool:
        return sum((await _open_by_pool(admin, "vp")).values()) == 40

    await _until(queued)
    vend_open = (await _open_by_pool(admin, "vp"))["vend"]
    claimed = await vendor.review.ClaimBatch(
        review_pb2.ClaimBatchRequest(project_id="vp", worker_ids=[f"w{n % 5}" for n in range(40)])
    )
    assert len(claimed.tasks) == vend_open  # every task of its pool, none of the other's
    q = await admin.workforce.GetQuality(workforce_pb2.GetQualityRequest(project_id="vp"))
    assert {p.pool_id: p.leased for p in q.pools if p.leased} == {"vend": vend_open}
    result = await vendor.review.SubmitBatch(
        review_pb2.SubmitBatchRequest(
            labels=[
                review_pb2.WorkerLabel(
                    worker_id=t.worker_id, task_id=t.task.task_id, lease_id=t.task.lease_id, label="yes"
                )
                for t in claimed.tasks
            ]
            + [
                review_pb2.WorkerLabel(
                    worker_id="w1", task_id=claimed.tasks[0].task.task_id, lease_id="x", label="yes"
                )
            ]
        )
    )
    assert [r.accepted for r in result.results[:-1]] == [True] * vend_open
    assert (
        not result.results[-1].accepted and result.results[-1].error
    )  # someone else's task: refused, said why
    q = await admin.workforce.GetQuality(workforce_pb2.GetQualityRequest(project_id="vp"))
    workers = {a.annotator_id for a in q.annotators if a.labels}
    assert workers == {f"vend/w{n}" for n in range(5)}  # vendor workers count as annotators
    # Not on a project that does not name its pool, and never as a plain annotator.
    assert await _code(
        vendor.review.ClaimBatch(review_pb2.ClaimBatchRequest(project_id="novendor", worker_ids=["w0"]))
    ) == (grpc.StatusCode.PERMISSION_DENIED)
    assert await _code(vendor.review.NextTask(review_pb2.NextTaskRequest(project_id="vp"))) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    house = await desk.person("h1", ["vp"])
    assert await _code(
        house.review.ClaimBatch(review_pb2.ClaimBatchRequest(project_id="vp", worker_ids=["w0"]))
    ) == (grpc.StatusCode.PERMISSION_DENIED)
