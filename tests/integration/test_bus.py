"""The bus layer against a real nats-server: topology, the worker's settle rules, the outbox relay.

Also the ops HTTP endpoint (it exports the bus metrics) and the local nats-server / service
process helpers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo

from services.cli.stack import LocalNats, ServiceProcess, StackError, pid_alive
from services.common.bus import topology
from services.common.bus.contracts import Subject, dlq_subject
from services.common.bus.outbox import OutboxRelay, Outgoing, enqueue
from services.common.bus.topology import CONSUMERS, PROJECTS_BUCKET, STREAMS, ConsumerSpec, apply_topology
from services.common.bus.worker import Delivery, Handler, Worker
from services.common.db import create_pool
from services.common.errors import FatalError, PermanentError, RetryableError
from services.common.http import Health, OpsServer
from services.gen.tandem.items.v1 import items_pb2

pytestmark = pytest.mark.integration

SPEC = ConsumerSpec(
    "test-worker", "TANDEM_ITEMS", (Subject.ITEMS_INGESTED,), ack_wait_seconds=5, max_deliver=2
)
OUTBOX_DDL = (
    "CREATE SCHEMA t; CREATE TABLE t.outbox (id bigserial primary key, subject text not null, "
    "msg_id text not null, payload bytea not null, created_at timestamptz not null default now())"
)


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def batch(batch_id: str) -> items_pb2.ItemBatch:
    return items_pb2.ItemBatch(
        batch_id=batch_id,
        project_id="p1",
        items=[items_pb2.Item(item_id=f"{batch_id}-1", project_id="p1", text="hello")],
    )


async def stream_count(js: JetStreamContext, stream: str) -> int:
    info = await js.stream_info(stream)
    return int(info.state.messages)


async def settled(js: JetStreamContext, through: int, spec: ConsumerSpec = SPEC) -> ConsumerInfo:
    """Wait until every message up to stream sequence `through` is acked or terminated."""
    infos: list[ConsumerInfo] = []

    async def check() -> bool:
        info = await js.consumer_info(spec.stream, spec.name)
        infos.append(info)
        # The ack floor, not num_pending: right after a publish the consumer may not count it yet.
        floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
        return floor >= through and info.num_pending == 0 and info.num_ack_pending == 0

    await eventually(check)
    return infos[-1]


# -- topology ------------------------------------------------------------------------------------


async def test_apply_topology_creates_everything_and_is_repeatable(js: JetStreamContext) -> None:
    await apply_topology(js)
    await apply_topology(js)

    names = {info.config.name for info in await js.streams_info()}
    assert {s.name for s in STREAMS} | {f"KV_{PROJECTS_BUCKET}"} <= names
    for spec in CONSUMERS:
        info = await js.consumer_info(spec.stream, spec.name)
        assert info.config.durable_name == spec.name
        assert info.config.max_deliver == spec.max_deliver
        filters = info.config.filter_subjects or [info.config.filter_subject]
        assert sorted(filters) == sorted(str(s) for s in spec.subjects)


async def test_changed_specs_reach_the_server(js: JetStreamContext, monkeypatch: pytest.MonkeyPatch) -> None:
    await apply_topology(js)
    consumers = tuple(
        dataclasses.replace(c, max_deliver=9, ack_wait_seconds=42.0) if c.name == "inference" else c
        for c in CONSUMERS
    )
    streams = tuple(
        dataclasses.replace(s, max_age_seconds=3600.0) if s.name == "TANDEM_ITEMS" else s for s in STREAMS
    )
    monkeypatch.setattr(topology, "CONSUMERS", consumers)
    monkeypatch.setattr(topology, "STREAMS", streams)

    await apply_topology(js)

    info = await js.consumer_info("TANDEM_ITEMS", "inference")
    assert info.config.max_deliver == 9
    assert info.config.ack_wait == pytest.approx(42.0)
    assert (await js.stream_info("TANDEM_ITEMS")).config.max_age == pytest.approx(3600.0)


# -- worker --------------------------------------------------------------------------------------


class Harness:
    """One worker on the test consumer, running in a task."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.seen: list[Delivery] = []
        self.fatal: list[BaseException] = []
        self._task: asyncio.Task[None] | None = None
        self.worker: Worker | None = None

    def start(self, handler: Handler) -> None:
        async def recording(delivery: Delivery) -> None:
            self.seen.append(delivery)
            await handler(delivery)

        self.worker = Worker(
            self.js,
            SPEC,
            recording,
            on_fatal=self.fatal.append,
            fetch_timeout=0.1,
            base_retry_delay=0.01,
        )
        self._task = asyncio.create_task(self.worker.run())

    async def publish(self, data: bytes) -> None:
        await self.js.publish(str(Subject.ITEMS_INGESTED), data)

    async def join(self, within: float = 5.0) -> None:
        assert self._task is not None
        await asyncio.wait_for(self._task, within)

    async def stop(self) -> None:
        if self.worker is not None and self._task is not None:
            self.worker.stop_fetching()
            await self.join()


@pytest.fixture
async def harness(js: JetStreamContext) -> AsyncIterator[Harness]:
    await apply_topology(js)
    await js.add_consumer(SPEC.stream, topology._consumer_config(SPEC))
    h = Harness(js)
    try:
        yield h
    finally:
        await h.stop()


async def dead_letters(js: JetStreamContext) -> int:
    return await stream_count(js, "TANDEM_DLQ")


async def test_success_is_acked(harness: Harness) -> None:
    async def ok(_: Delivery) -> None:
        return None

    harness.start(ok)
    await harness.publish(batch("b1").SerializeToString())

    info = await settled(harness.js, through=1)
    assert info.delivered is not None
    assert info.delivered.stream_seq == 1
    [delivery] = harness.seen
    assert delivery.subject is Subject.ITEMS_INGESTED
    assert delivery.message == batch("b1")
    assert delivery.msg_id == "TANDEM_ITEMS:1"
    assert delivery.num_delivered == 1
    assert await dead_letters(harness.js) == 0


async def test_undecodable_payload_is_dead_lettered_and_the_worker_goes_on(harness: Harness) -> None:
    async def ok(_: Delivery) -> None:
        return None

    harness.start(ok)
    await harness.publish(b"\xff\xff\xff not a protobuf")
    await harness.publish(batch("b2").SerializeToString())

    await eventually(lambda: _has_seen(harness, 1))
    await settled(harness.js, through=2)
    assert [d.message for d in harness.seen] == [batch("b2")]
    dead = await harness.js.get_last_msg("TANDEM_DLQ", dlq_subject(SPEC.name))
    assert dead.data == b"\xff\xff\xff not a protobuf"
    assert dead.headers is not None
    assert dead.headers["Tandem-Error"].startswith("permanent:")
    assert dead.headers["Tandem-Subject"] == str(Subject.ITEMS_INGESTED)
    assert dead.headers["Tandem-Stream-Seq"] == "1"
    assert await dead_letters(harness.js) == 1


async def _has_seen(harness: Harness, n: int) -> bool:
    return len(harness.seen) >= n


async def test_retryable_error_is_redelivered(harness: Harness) -> None:
    async def flaky(delivery: Delivery) -> None:
        if delivery.num_delivered == 1:
            raise RetryableError("database busy", delay=0.01)

    harness.start(flaky)
    await harness.publish(batch("b3").SerializeToString())

    await eventually(lambda: _has_seen(harness, 2))
    await settled(harness.js, through=1)
    assert [d.num_delivered for d in harness.seen] == [1, 2]
    assert len({d.msg_id for d in harness.seen}) == 1
    assert await dead_letters(harness.js) == 0


@pytest.mark.parametrize("error", [RetryableError("still down", delay=0.01), RuntimeError("bug")])
async def test_failing_until_max_deliver_is_dead_lettered(harness: Harness, error: Exception) -> None:
    async def failing(_: Delivery) -> None:
        raise error

    harness.start(failing)
    await harness.publish(batch("b4").SerializeToString())

    await eventually(lambda: _dead_letter_count_is(harness.js, 1))
    await settled(harness.js, through=1)
    assert [d.num_delivered for d in harness.seen] == [1, 2]
    dead = await harness.js.get_last_msg("TANDEM_DLQ", dlq_subject(SPEC.name))
    assert dead.headers is not None
    assert dead.headers["Tandem-Deliveries"] == "2"
    assert dead.headers["Tandem-Error"].startswith("gave up after 2 deliveries")


async def _dead_letter_count_is(js: JetStreamContext, n: int) -> bool:
    return await dead_letters(js) == n


async def test_permanent_error_is_dead_lettered_at_once(harness: Harness) -> None:
    async def refusing(_: Delivery) -> None:
        raise PermanentError("unknown label")

    harness.start(refusing)
    await harness.publish(batch("b5").SerializeToString())

    await eventually(lambda: _dead_letter_count_is(harness.js, 1))
    await settled(harness.js, through=1)
    assert len(harness.seen) == 1
    dead = await harness.js.get_last_msg("TANDEM_DLQ", dlq_subject(SPEC.name))
    assert dead.headers is not None
    assert dead.headers["Tandem-Error"] == "permanent: unknown label"
    assert dead.headers["Tandem-Deliveries"] == "1"


async def test_fatal_error_stops_the_worker_and_leaves_the_message(harness: Harness) -> None:
    async def fatal(_: Delivery) -> None:
        raise FatalError("engine died")

    harness.start(fatal)
    await harness.publish(batch("b6").SerializeToString())

    await harness.join()  # run() returns by itself
    assert [str(e) for e in harness.fatal] == ["engine died"]
    assert await dead_letters(harness.js) == 0

    # The message was nak'ed, not acked: the next worker (another replica) gets it again.
    async def ok(_: Delivery) -> None:
        return None

    harness.start(ok)
    await settled(harness.js, through=1)
    assert [d.num_delivered for d in harness.seen] == [1, 2]


# -- outbox --------------------------------------------------------------------------------------


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, min_size=1, max_size=4)
    try:
        await pool.execute(OUTBOX_DDL)
        yield pool
    finally:
        await pool.close()


async def outbox_rows(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM t.outbox"))


async def _outbox_empty(pool: asyncpg.Pool) -> bool:
    return await outbox_rows(pool) == 0


async def test_outbox_publishes_committed_rows_once(pool: asyncpg.Pool, js: JetStreamContext) -> None:
    await apply_topology(js)
    committed = [Outgoing("ingest:b1", batch("b1")), Outgoing("ingest:b2", batch("b2"))]
    async with pool.acquire() as conn, conn.transaction():
        await enqueue(conn, "t", committed)
    with pytest.raises(RuntimeError, match="rolled back"):
        async with pool.acquire() as conn, conn.transaction():
            await enqueue(conn, "t", [Outgoing("ingest:b3", batch("b3"))])
            raise RuntimeError("rolled back")

    relay = OutboxRelay(pool, js, "t")
    assert await relay.publish_pending() == 2
    assert await relay.publish_pending() == 0
    assert await outbox_rows(pool) == 0
    assert await stream_count(js, "TANDEM_ITEMS") == 2
    for seq, outgoing in enumerate(committed, start=1):
        msg = await js.get_msg("TANDEM_ITEMS", seq)
        assert msg.headers is not None
        assert msg.headers["Nats-Msg-Id"] == outgoing.msg_id
        assert msg.subject == str(Subject.ITEMS_INGESTED)
        assert items_pb2.ItemBatch.FromString(msg.data or b"") == outgoing.message

    # A crash between publish and delete leaves the rows behind: sending them again is absorbed
    # by JetStream's duplicate window.
    async with pool.acquire() as conn, conn.transaction():
        await enqueue(conn, "t", committed)
    assert await relay.publish_pending() == 2
    assert await stream_count(js, "TANDEM_ITEMS") == 2


async def test_outbox_relay_loop_publishes_on_notify(pool: asyncpg.Pool, js: JetStreamContext) -> None:
    await apply_topology(js)
    # A long sweep: only notify() can explain a prompt publish.
    relay = OutboxRelay(pool, js, "t", sweep_seconds=60.0)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        async with pool.acquire() as conn, conn.transaction():
            await enqueue(conn, "t", [Outgoing("ingest:n1", batch("n1"))])
        relay.notify()
        await eventually(lambda: _stream_has(js, "TANDEM_ITEMS", 1), within=5)
        # The row is deleted in the same transaction, which commits just after the publish acks.
        await eventually(lambda: _outbox_empty(pool), within=5)
    finally:
        stop.set()
        relay.notify()
        await asyncio.wait_for(task, 5)


class CommitDuringFirstPass(OutboxRelay):
    """Another transaction commits and notifies while the relay's first pass is running."""

    first = True

    async def publish_pending(self, limit: int = 500) -> int:
        published = await super().publish_pending(limit)
        if self.first:
            self.first = False
            async with self._pool.acquire() as conn, conn.transaction():
                await enqueue(conn, "t", [Outgoing("ingest:late", batch("late"))])
            self.notify()
        return published


async def test_outbox_relay_keeps_a_notify_that_arrives_during_a_pass(
    pool: asyncpg.Pool, js: JetStreamContext
) -> None:
    await apply_topology(js)
    relay = CommitDuringFirstPass(pool, js, "t", sweep_seconds=60.0)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        await eventually(lambda: _stream_has(js, "TANDEM_ITEMS", 1), within=5)
    finally:
        stop.set()
        relay.notify()
        await asyncio.wait_for(task, 5)


async def _stream_has(js: JetStreamContext, stream: str, n: int) -> bool:
    return await stream_count(js, stream) == n


# -- ops endpoint --------------------------------------------------------------------------------


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def test_ops_server_probes_and_metrics() -> None:
    health = Health()
    ops = OpsServer(health, "127.0.0.1", 0)
    await ops.start()
    try:
        assert await http_get(ops.port, "/livez") == (200, "ok\n")
        assert await http_get(ops.port, "/readyz") == (503, "starting\n")
        health.set_ready()
        assert await http_get(ops.port, "/readyz?verbose=1") == (200, "ok\n")
        health.set_not_ready("draining")
        assert await http_get(ops.port, "/readyz") == (503, "draining\n")
        status, body = await http_get(ops.port, "/metrics")
        assert status == 200
        assert "tandem_bus_messages_total" in body
        assert (await http_get(ops.port, "/nope"))[0] == 404
    finally:
        await ops.stop()


# -- local processes -----------------------------------------------------------------------------


def test_local_nats_starts_and_stops(tmp_path: Path) -> None:
    server = LocalNats(tmp_path / "nats").start()
    pid = server.pid
    assert pid is not None
    assert server.url.startswith("nats://127.0.0.1:")
    assert "Server is ready" in (tmp_path / "nats" / "nats.log").read_text()
    server.stop()
    assert not pid_alive(pid)
    with pytest.raises(StackError):
        _ = server.url


def test_local_nats_needs_the_wheel_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(StackError, match="make install"):
        LocalNats(tmp_path / "nats").start()


def test_service_process_fails_fast_with_its_log(tmp_path: Path) -> None:
    proc = ServiceProcess(
        "no_such_service", nats_url="nats://127.0.0.1:1", database_url="postgresql:///x", log_dir=tmp_path
    )
    proc.start()
    try:
        with pytest.raises(StackError, match=r"No module named services\.no_such_service"):
            proc.wait_ready(timeout=30)
    finally:
        proc.terminate()
    assert not proc.running
