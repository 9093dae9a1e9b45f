"""The fault tier: the whole stack, with its own nats-server and PostgreSQL, through crashes and
outages while people label, loses no item and dead-letters no good message.

Each test runs a Stack with servers of its own (not the session's shared ones), so nats-server
and PostgreSQL can be stopped and started again on the same address with their data kept:

- every service in turn is killed with SIGKILL mid-stream and restarted, items arriving meanwhile;
- nats-server is stopped for a few seconds and started again with its JetStream store;
- PostgreSQL is stopped for a minute with items in flight and the workforce still at work.

Afterwards every item must be final, the export must hold each ingested item exactly once and
TANDEM_DLQ must be empty: the worker's retry budget (about 14 minutes) outlasts every outage.
The test's own calls retry UNAVAILABLE for as long as an outage can last; gRPC's channel retries
give up after a few seconds by design.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Self, TypeVar

import grpc
import nats
import pytest
from nats.js.errors import NotFoundError

from services.cli.client import Clients
from services.cli.commands import export
from services.cli.dlq import DLQ_STREAM, DeadLetter, list_dead_letters
from services.cli.stack import LocalPostgres, Stack, StackError, log_tail
from services.cli.workforce import Workforce, WorkforceConfig
from services.gen.tandem.ingest.v1 import ingest_pb2
from services.gen.tandem.projects.v1 import projects_pb2
from tests.e2e.conftest import SCORER_ENV
from tests.e2e.corpus import LABELS, make_corpus

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]

log = logging.getLogger(__name__)

PROJECT = "fault-topics"
KILLED = ("ingest", "inference", "scorer", "review", "export")
# Codes a call may get while its service, the bus or the database is away.
_AWAY = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# Every item final within this, outages included: the longest back-off is 60 s a try.
SETTLE_SECONDS = 600.0

T = TypeVar("T")
Row = dict[str, str]


# A simulated annotator whose submit fails in an outage gives up its round and leaves the task
# leased; it returns to the queue when the lease ends (five minutes by default, far beyond what a
# test-speed annotator needs).
FAULT_ENV = {**SCORER_ENV, "TANDEM_REVIEW_LEASE_SECONDS": "20"}


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    # No URLs: the stack starts nats-server and PostgreSQL of its own under its state dir.
    s = Stack(tmp_path / "state", extra_env=FAULT_ENV)
    await asyncio.to_thread(s.start)
    try:
        yield s
    finally:
        await asyncio.to_thread(s.stop)


async def _retrying(call: Callable[[], Awaitable[T]], within: float = 180.0) -> T:
    """`call` again while what it talks to is away, up to `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in _AWAY or time.monotonic() > deadline:
                raise
            log.info("call failed with %s; again shortly", exc.code().name)
        await asyncio.sleep(1.0)


def _diagnosis(stack: Stack) -> str:
    """Each log's error lines and tail, for a failure message."""
    logs = sorted((stack.state_dir / "logs").glob("*.log"))
    logs += [stack.state_dir / "nats" / "nats.log", stack.state_dir / "postgres" / "log"]
    parts = []
    for path in logs:
        text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
        errors = [line for line in text.splitlines() if "ERROR" in line or "dead-letter" in line]
        parts.append(f"== {path.name}: {len(errors)} error lines, last ones:\n" + "\n".join(errors[-15:]))
        parts.append(f"-- {path.name} tail:\n{log_tail(path, 10)}")
    return "\n".join(parts)


async def _create_project(clients: Clients) -> None:
    project = projects_pb2.Project(
        project_id=PROJECT,
        labels=[projects_pb2.LabelDef(name=k, description=v) for k, v in LABELS.items()],
        target_accuracy=0.9,
    )
    await _retrying(
        lambda: clients.ingest.CreateProject(ingest_pb2.CreateProjectRequest(project=project), timeout=30)
    )


async def _submit(clients: Clients, rows: Sequence[Row]) -> None:
    """Ingest `rows`, waiting out an outage; a retried batch may find part of itself already in."""
    request = ingest_pb2.SubmitBatchRequest(
        project_id=PROJECT,
        items=[ingest_pb2.RawItem(external_id=r["id"], text=r["text"].encode()) for r in rows],
    )
    response = await _retrying(lambda: clients.ingest.SubmitBatch(request, timeout=60))
    refused = [r for r in response.results if r.outcome == ingest_pb2.ITEM_OUTCOME_REJECTED]
    assert not refused, f"good items rejected: {refused}"
    assert response.accepted + response.duplicates == len(rows)


class Loop:
    """The workforce labeling in the background until every ingested item is final.

    The simulated annotators give up on an error they do not expect (a label refused with
    UNAVAILABLE while the database is away); a person would just try again, so a round that
    ends in an RPC error starts a new one.
    """

    def __init__(self, stack: Stack, clients: Clients, rows: Sequence[Row]) -> None:
        self._stack = stack
        self._clients = clients
        self._total = len(rows)
        self._workforce = Workforce(
            clients,
            {r["id"]: r["label"] for r in rows},
            WorkforceConfig(project_id=PROJECT, annotators=3, error_rate=0.0, seconds_per_item=0.02),
        )
        self._finished = asyncio.Event()
        self._rounds = 0
        self._task: asyncio.Task[None] | None = None

    async def complete(self) -> bool:
        try:
            s = await self._clients.stats(PROJECT)
        except grpc.aio.AioRpcError:
            return False  # some service is away: ask again later
        done = s.ingest.items == self._total and s.export.finalized == self._total
        if done:
            self._finished.set()
        return done

    async def labels_done(self) -> int:
        try:
            return (await self._clients.stats(PROJECT)).review.done
        except grpc.aio.AioRpcError:
            return 0

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        if not self._task.done():
            self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while not self._finished.is_set():
            self._rounds += 1
            stop = asyncio.Event()
            try:
                await self._workforce.run(self.complete, stop)
            except grpc.aio.AioRpcError as exc:
                log.info("workforce round %d ended with %s; a new one", self._rounds, exc.code().name)
            finally:
                stop.set()  # the round's other annotators stop too
            await asyncio.sleep(1.0)

    async def wait_until(self, predicate: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self._task is not None and self._task.done():
                self._task.result()  # an error the workforce cannot go on after
            _assert_all_running(self._stack)
            if await predicate():
                return
            await asyncio.sleep(0.5)
        stats = await self._clients.stats(PROJECT) if await self.reachable() else "(unreachable)"
        raise AssertionError(f"timed out waiting for {what}; stats:\n{stats}\n{_diagnosis(self._stack)}")

    async def reachable(self) -> bool:
        try:
            await self._clients.stats(PROJECT)
        except grpc.aio.AioRpcError:
            return False
        return True

    async def finish(self) -> None:
        await self.wait_until(self.complete, SETTLE_SECONDS, "every item to be final")
        assert self._task is not None
        await asyncio.wait_for(self._task, timeout=60)


async def _assert_exported_exactly_once(
    stack: Stack, clients: Clients, rows: Sequence[Row], out: Path
) -> None:
    info, path = await _retrying(lambda: export(clients, PROJECT, out))
    exported = [json.loads(line) for line in path.read_text().splitlines()]
    ids = [r["id"] for r in exported]
    assert len(ids) == len(set(ids)), "an item was exported twice"
    assert set(ids) == {r["id"] for r in rows}, "exported items differ from ingested items"
    assert info.rows == len(rows) and info.pending == 0
    gold = {r["id"]: r["label"] for r in rows}
    for r in exported:
        if r["source"] == "human":
            assert r["label"] == gold[r["id"]]  # error rate 0: a human label is the gold one
    letters = await _dead_letters(stack.nats_url)
    assert not letters, f"dead letters after the faults: {[(d.consumer, d.error) for d in letters]}"
    _assert_all_running(stack)


def _assert_all_running(stack: Stack) -> None:
    gone = [name for name, proc in stack.processes.items() if not proc.running]
    assert not gone, f"services exited on their own: {gone}\n{_diagnosis(stack)}"


async def _dead_letters(url: str) -> list[DeadLetter]:
    nc = await nats.connect(url, connect_timeout=5)
    try:
        js = nc.jetstream()
        try:
            await js.stream_info(DLQ_STREAM)
        except NotFoundError:
            return []  # never created: nothing was dead-lettered
        return await list_dead_letters(js, limit=1000)
    finally:
        await nc.close()


async def test_kill_each_service_and_restart_nats(stack: Stack, tmp_path: Path) -> None:
    rows = make_corpus(per_label=50)  # 150 items
    batches = [rows[:40], *(rows[40 + 15 * i : 55 + 15 * i] for i in range(len(KILLED))), rows[115:]]
    assert sum(map(len, batches)) == len(rows)
    assert stack.nats is not None

    async with Clients(stack.targets, token=stack.admin_token) as clients:
        await _create_project(clients)
        await _submit(clients, batches[0])
        async with Loop(stack, clients, rows) as loop:
            await loop.wait_until(lambda: _at_least(loop.labels_done, 10), 180, "the first human labels")

            # -- SIGKILL each service mid-stream; items arrive while it is down -----------------------
            for name, batch in zip(KILLED, batches[1:], strict=False):
                proc = stack.processes[name]
                proc.kill()
                submitted = asyncio.create_task(_submit(clients, batch))
                await asyncio.sleep(1.5)
                await asyncio.to_thread(proc.start)
                await asyncio.to_thread(proc.wait_ready, 90)
                await submitted
                await asyncio.sleep(2.0)  # let the restarted service take up its work before the next

            # -- nats-server away for five seconds, back on the same port with its store -------------
            url = stack.nats_url
            await asyncio.to_thread(stack.nats.stop)
            submitted = asyncio.create_task(_submit(clients, batches[-1]))  # ingest commits to its outbox
            await asyncio.sleep(5.0)
            await asyncio.to_thread(stack.nats.start)
            assert stack.nats.url == url
            await submitted

            await loop.finish()
            await _assert_exported_exactly_once(stack, clients, rows, tmp_path / "out.jsonl")


async def test_postgres_away_for_a_minute(stack: Stack, tmp_path: Path) -> None:
    rows = make_corpus(per_label=50)  # 150 items
    first, in_flight, after = rows[:60], rows[60:130], rows[130:]
    assert stack.postgres is not None

    async with Clients(stack.targets, token=stack.admin_token) as clients:
        await _create_project(clients)
        await _submit(clients, first)
        async with Loop(stack, clients, rows) as loop:
            await loop.wait_until(lambda: _at_least(loop.labels_done, 10), 180, "the first human labels")

            # Items are on their way through inference and the scorer when the database goes.
            await _submit(clients, in_flight)
            url = stack.postgres.url
            await asyncio.to_thread(stack.postgres.stop)
            await asyncio.sleep(60.0)  # the workforce and the workers keep trying meanwhile
            await _start_again(stack.postgres)
            assert stack.postgres.url == url
            # The first calls may still meet a pool's dead connection; the services' stats read the
            # database, so once they answer the outage is over for a caller too.
            await loop.wait_until(loop.reachable, 120, "the services to reach the database again")
            await _submit(clients, after)

            await loop.finish()
            await _assert_exported_exactly_once(stack, clients, rows, tmp_path / "out.jsonl")


async def _at_least(count: Callable[[], Awaitable[int]], n: int) -> bool:
    return await count() >= n


async def _start_again(postgres: LocalPostgres) -> None:
    """Start the test's own PostgreSQL again. pgserver forks from this (threaded) test process to
    run pg_ctl, and such a child once died before exec: a harness failure, not the product's, so
    the start is tried again (PostgreSQL recovers from the unclean stop that leaves)."""
    for attempt in range(3):
        try:
            await asyncio.to_thread(postgres.start)
            return
        except StackError:
            if attempt == 2:
                raise
            await asyncio.sleep(2.0)
