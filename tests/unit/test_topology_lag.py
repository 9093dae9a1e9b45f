"""Each worker exports its consumer's backlog for the lag alerts, and a failed read harms nothing."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from prometheus_client import REGISTRY

from services.common.bus.topology import INFERENCE
from services.common.bus.worker import Worker


class IdleSub:
    async def fetch(self, batch: int, timeout: float) -> list[Any]:  # noqa: ASYNC109 (nats-py's signature)
        await asyncio.sleep(timeout)
        raise NatsTimeoutError

    async def unsubscribe(self) -> None:
        pass


class FakeJetStream:
    def __init__(self, infos: list[Any], reads: int) -> None:
        self.infos = infos
        self.reads = 0
        self.wanted = reads
        self.done = asyncio.Event()

    async def pull_subscribe_bind(self, *, durable: str, stream: str) -> IdleSub:
        return IdleSub()

    async def consumer_info(self, stream: str, consumer: str) -> Any:
        info = self.infos[min(self.reads, len(self.infos) - 1)]
        self.reads += 1
        if self.reads >= self.wanted:
            self.done.set()
        if isinstance(info, Exception):
            raise info
        return info


def _sample(name: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"consumer": INFERENCE.name})


async def _run(fake: FakeJetStream) -> None:
    def fatal(exc: BaseException) -> None:
        raise AssertionError(f"worker stopped on {exc!r}")

    js: JetStreamContext = fake  # type: ignore[assignment]
    worker = Worker(js, INFERENCE, handler=_never, on_fatal=fatal, fetch_timeout=0.01, lag_interval=0.01)
    task = asyncio.create_task(worker.run())
    async with asyncio.timeout(5):
        await fake.done.wait()
    worker.stop_fetching()
    async with asyncio.timeout(5):
        await task


async def _never(delivery: Any) -> None:
    raise AssertionError("no message was fetched")


async def test_worker_exports_pending_and_ack_pending() -> None:
    fake = FakeJetStream([SimpleNamespace(num_pending=42, num_ack_pending=7)], reads=2)
    await _run(fake)
    assert _sample("tandem_bus_consumer_pending") == 42
    assert _sample("tandem_bus_consumer_ack_pending") == 7


async def test_a_failed_read_is_skipped_and_the_next_one_counts() -> None:
    fake = FakeJetStream(
        [ConnectionError("bus down"), SimpleNamespace(num_pending=3, num_ack_pending=0)], reads=3
    )
    await _run(fake)
    assert _sample("tandem_bus_consumer_pending") == 3
    assert _sample("tandem_bus_consumer_ack_pending") == 0
