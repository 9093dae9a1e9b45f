"""Retry budget and dead letters against a real nats-server: what is retried, what is
dead-lettered at once, and `tandem dlq list|replay` bringing a dead letter back exactly once."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from nats.js import JetStreamContext
from nats.js.errors import ServiceUnavailableError

from services.cli import dlq
from services.cli.__main__ import _parser
from services.common.bus import topology
from services.common.bus.contracts import Subject, dlq_subject
from services.common.bus.topology import ConsumerSpec, apply_topology
from services.common.bus.worker import Delivery, Handler, Worker
from services.common.errors import PoisonMessage
from services.gen.tandem.items.v1 import items_pb2
from tests.integration.test_bus import batch, eventually, settled, stream_count

pytestmark = pytest.mark.integration

# Room for a few retries; the delays below keep them to milliseconds.
SPEC = ConsumerSpec("dlq-test", "TANDEM_ITEMS", (Subject.ITEMS_INGESTED,), ack_wait_seconds=5, max_deliver=4)


class Consumer:
    """One worker on SPEC, its deliveries recorded; the handler can be swapped while it runs."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.seen: list[Delivery] = []
        self.processed: list[str] = []
        self.handler: Handler | None = None
        self.worker = Worker(
            js,
            SPEC,
            self._handle,
            on_fatal=lambda exc: None,
            fetch_timeout=0.1,
            base_retry_delay=0.01,
            max_retry_delay=0.05,
            fetch_retry_delay=0.01,
        )
        self.task: asyncio.Task[None] | None = None

    async def _handle(self, delivery: Delivery) -> None:
        self.seen.append(delivery)
        assert self.handler is not None
        await self.handler(delivery)
        assert isinstance(delivery.message, items_pb2.ItemBatch)
        self.processed.append(delivery.message.batch_id)

    def start(self, handler: Handler) -> None:
        self.handler = handler
        self.task = asyncio.create_task(self.worker.run())

    async def publish(self, batch_id: str) -> None:
        await self.js.publish(str(Subject.ITEMS_INGESTED), batch(batch_id).SerializeToString())

    async def stop(self) -> None:
        if self.task is not None:
            self.worker.stop_fetching()
            await asyncio.wait_for(self.task, 5)


@pytest.fixture
async def consumer(js: JetStreamContext) -> AsyncIterator[Consumer]:
    await apply_topology(js)
    await js.add_consumer(SPEC.stream, topology._consumer_config(SPEC))
    c = Consumer(js)
    try:
        yield c
    finally:
        await c.stop()


async def dead_letters(js: JetStreamContext) -> int:
    return await stream_count(js, dlq.DLQ_STREAM)


def refusing(*batch_ids: str) -> Handler:
    """A handler with a bug that rejects these batches as poison (until it is "fixed")."""

    async def handle(delivery: Delivery) -> None:
        assert isinstance(delivery.message, items_pb2.ItemBatch)
        if delivery.message.batch_id in batch_ids:
            raise PoisonMessage(f"batch {delivery.message.batch_id} has no labels")

    return handle


async def accepting(_: Delivery) -> None:
    return None


# -- retry budget --------------------------------------------------------------------------------


async def test_a_database_blip_is_retried_not_dead_lettered(
    consumer: Consumer, caplog: pytest.LogCaptureFixture
) -> None:
    async def blip(delivery: Delivery) -> None:
        if delivery.num_delivered <= 2:
            raise asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle")

    caplog.set_level(logging.WARNING, logger="services.common.bus.worker")
    consumer.start(blip)
    await consumer.publish("b1")

    await eventually(lambda: _processed(consumer, 1))
    await settled(consumer.js, through=1, spec=SPEC)
    assert [d.num_delivered for d in consumer.seen] == [1, 2, 3]
    assert consumer.processed == ["b1"]
    assert await dead_letters(consumer.js) == 0
    retries = [r for r in caplog.records if "retry in" in r.getMessage()]
    assert [r.levelno for r in retries] == [logging.WARNING, logging.WARNING]
    assert "dlq-test" in retries[0].getMessage()
    assert "delivery 1 of 4" in retries[0].getMessage()
    assert "ConnectionDoesNotExistError" in retries[1].getMessage()
    assert not retries[1].exc_info  # a known blip: no traceback


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions.UniqueViolationError('duplicate key value violates unique constraint "x"'),
        ValueError("confidence must be in [0, 1]"),
    ],
    ids=["integrity", "value"],
)
async def test_bad_data_is_dead_lettered_at_once(consumer: Consumer, error: Exception) -> None:
    async def failing(_: Delivery) -> None:
        raise error

    consumer.start(failing)
    await consumer.publish("b2")

    await eventually(lambda: _dead_letters_are(consumer.js, 1))
    await settled(consumer.js, through=1, spec=SPEC)
    assert [d.num_delivered for d in consumer.seen] == [1]
    dead = await consumer.js.get_last_msg(dlq.DLQ_STREAM, dlq_subject(SPEC.name))
    assert dead.headers is not None
    assert dead.headers["Tandem-Error"].startswith(f"permanent: {type(error).__name__}(")
    assert dead.headers["Tandem-Deliveries"] == "1"


async def test_a_jetstream_503_on_fetch_does_not_stop_the_worker(
    consumer: Consumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fetch = JetStreamContext.PullSubscription.fetch
    failures = 3

    async def unavailable(self: JetStreamContext.PullSubscription, *args: object, **kwargs: object) -> object:
        nonlocal failures
        if failures:
            failures -= 1
            raise ServiceUnavailableError(code=503, description="JetStream system temporarily unavailable")
        return await fetch(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(JetStreamContext.PullSubscription, "fetch", unavailable)
    consumer.start(accepting)
    await consumer.publish("b3")

    await eventually(lambda: _processed(consumer, 1))
    assert failures == 0
    assert consumer.task is not None and not consumer.task.done()


# -- list and replay -----------------------------------------------------------------------------


async def test_poison_is_listed_then_replayed_once_the_cause_is_fixed(
    consumer: Consumer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    consumer.start(refusing("bad"))
    await consumer.publish("good")
    await consumer.publish("bad")
    await eventually(lambda: _dead_letters_are(consumer.js, 1))
    await settled(consumer.js, through=2, spec=SPEC)
    assert consumer.processed == ["good"]
    # Another consumer's dead letter, to show the filter.
    await consumer.js.publish(
        dlq_subject("other"), b"x", headers={"Tandem-Subject": "tandem.x", "Tandem-Error": "e"}
    )

    [letter] = await dlq.list_dead_letters(consumer.js, SPEC.name)
    assert letter.consumer == SPEC.name
    assert letter.subject == str(Subject.ITEMS_INGESTED)
    assert letter.error == "permanent: batch bad has no labels"
    assert letter.deliveries == 1
    assert letter.size == len(batch("bad").SerializeToString())
    assert letter.time is not None
    assert [x.consumer for x in await dlq.list_dead_letters(consumer.js)] == [SPEC.name, "other"]
    assert len(await dlq.list_dead_letters(consumer.js, limit=1)) == 1

    url = consumer.js._nc.connected_url
    assert url is not None
    nats_url = f"nats://{url.hostname}:{url.port}"
    assert await dlq.run(_cli("list", "--nats-url", nats_url, state_dir=tmp_path)) == 0
    listed = capsys.readouterr().out
    assert SPEC.name in listed and "other" in listed and "has no labels" in listed

    # A dry run changes nothing.
    args = _cli(
        "replay", "--consumer", SPEC.name, "--all", "--dry-run", "--nats-url", nats_url, state_dir=tmp_path
    )
    assert await dlq.run(args) == 0
    assert f"seq {letter.seq}: would replay" in capsys.readouterr().out
    assert await dead_letters(consumer.js) == 2

    consumer.handler = accepting  # the cause is fixed
    args = _cli("replay", "--consumer", SPEC.name, "--all", "--nats-url", nats_url, state_dir=tmp_path)
    assert await dlq.run(args) == 0
    assert f"seq {letter.seq}: replayed" in capsys.readouterr().out

    await eventually(lambda: _processed(consumer, 2))
    await settled(consumer.js, through=3, spec=SPEC)
    assert consumer.processed == ["good", "bad"]
    assert await dlq.list_dead_letters(consumer.js, SPEC.name) == []
    # The other consumer's dead letter stays.
    assert [x.consumer for x in await dlq.list_dead_letters(consumer.js)] == ["other"]


async def test_replaying_twice_processes_once(consumer: Consumer, monkeypatch: pytest.MonkeyPatch) -> None:
    consumer.start(refusing("bad1", "bad2"))
    await consumer.publish("bad1")
    await consumer.publish("bad2")
    await eventually(lambda: _dead_letters_are(consumer.js, 2))
    first, second = await dlq.list_dead_letters(consumer.js, SPEC.name)
    consumer.handler = accepting

    # A second replay of a replayed dead letter finds nothing to send.
    assert [r.outcome for r in await dlq.replay(consumer.js, SPEC.name, [first.seq])] == ["replayed"]
    assert [r.outcome for r in await dlq.replay(consumer.js, SPEC.name, [first.seq])] == ["missing"]

    # A replay that dies between publish and delete, then runs again: the duplicate is dropped.
    delete = JetStreamContext.delete_msg
    crashed = False

    async def crash_once(self: JetStreamContext, stream_name: str, seq: int) -> bool:
        nonlocal crashed
        if not crashed:
            crashed = True
            raise ConnectionResetError("lost the connection")
        return await delete(self, stream_name, seq)

    monkeypatch.setattr(JetStreamContext, "delete_msg", crash_once)
    with pytest.raises(ConnectionResetError):
        await dlq.replay(consumer.js, SPEC.name, [second.seq])
    assert [r.outcome for r in await dlq.replay(consumer.js, SPEC.name, [second.seq])] == ["duplicate"]

    await eventually(lambda: _processed(consumer, 2))
    await settled(consumer.js, through=4, spec=SPEC)
    assert sorted(consumer.processed) == ["bad1", "bad2"]
    assert await stream_count(consumer.js, "TANDEM_ITEMS") == 4  # two originals, two replays
    assert await dead_letters(consumer.js) == 0


async def test_replay_refuses_another_consumers_dead_letter(js: JetStreamContext) -> None:
    await apply_topology(js)
    ack = await js.publish(dlq_subject("other"), b"x", headers={"Tandem-Subject": "tandem.items.v1.ingested"})
    other, missing = await dlq.replay(js, "dlq-test", [ack.seq, ack.seq + 5])
    assert other.outcome == "other consumer"
    assert missing.outcome == "missing"
    assert await dead_letters(js) == 1


def test_nats_url_comes_from_the_flag_the_env_or_tandem_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(dlq.NATS_URL_ENV, raising=False)
    assert dlq.nats_url_for(tmp_path) == dlq.DEFAULT_NATS_URL
    (tmp_path / "nats").mkdir()
    (tmp_path / "nats" / "nats.log").write_text(
        "[1] [INF] Listening for client connections on 127.0.0.1:41234\n[1] [INF] Server is ready\n"
    )
    assert dlq.nats_url_for(tmp_path) == "nats://127.0.0.1:41234"
    monkeypatch.setenv(dlq.NATS_URL_ENV, "nats://nats:4222")
    assert dlq.nats_url_for(tmp_path) == "nats://nats:4222"
    assert dlq.nats_url_for(tmp_path, "nats://flag:1") == "nats://flag:1"


def _cli(*argv: str, state_dir: Path) -> argparse.Namespace:
    return _parser().parse_args(["--state-dir", str(state_dir), "dlq", *argv])


async def _processed(consumer: Consumer, n: int) -> bool:
    return len(consumer.processed) >= n


async def _dead_letters_are(js: JetStreamContext, n: int) -> bool:
    return await dead_letters(js) == n
