"""The lifecycle every service shares.

Start-up enters, in order: PostgreSQL pool (+ migrations) → NATS (+ topology) → HTTP ops
endpoint → gRPC server with health → workers and background tasks; then readiness goes green.
SIGTERM/SIGINT runs the drain in the order that loses nothing: readiness off and gRPC health
NOT_SERVING → stop fetching → wait for in-flight messages (bounded) → stop background tasks →
drain NATS → stop gRPC (grace) → close the pool. A FatalError anywhere ends the process with a
non-zero status after the same drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import asyncpg
import grpc
import nats
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from services.common.auth import AuthInterceptor
from services.common.bus.outbox import OutboxRelay
from services.common.bus.topology import ConsumerSpec, apply_topology
from services.common.bus.worker import Handler, Worker
from services.common.db import create_pool, migrate
from services.common.errors import FatalError
from services.common.grpc_calls import CallInterceptor
from services.common.http import Health, OpsServer
from services.common.logs import configure_logging
from services.common.settings import CommonSettings, ServiceSettings

log = logging.getLogger(__name__)


class Runtime:
    """What a service's set-up function gets to wire its handlers and servicers."""

    def __init__(self, name: str, common: CommonSettings, own: ServiceSettings) -> None:
        self.name = name
        self.common = common
        self.own = own
        self.stop = asyncio.Event()
        # Relays outlive the workers and the gRPC server so what they commit while draining
        # is still published.
        self.relay_stop = asyncio.Event()
        self.health = Health()
        self.grpc_health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        # Every call is authenticated and authorized before its handler runs (health excepted).
        self.auth = AuthInterceptor()
        # Measured first, so a call the auth check refuses is counted with its code (and an outage
        # met by the auth check's own reads is answered UNAVAILABLE too).
        self.grpc_server = grpc.aio.server(
            interceptors=[CallInterceptor(), self.auth],
            options=[("grpc.max_receive_message_length", 64 << 20)],
        )
        self.workers: list[Worker] = []
        self.relays: list[OutboxRelay] = []
        self._background: list[Callable[[asyncio.Event], Coroutine[Any, Any, None]]] = []
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self.fatal: BaseException | None = None
        self._pool: asyncpg.Pool | None = None
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self.grpc_port = 0
        self.http_port = 0

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "service started without a database"
        return self._pool

    @property
    def nc(self) -> NatsClient:
        assert self._nc is not None
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None
        return self._js

    def fail(self, exc: BaseException) -> None:
        if self.fatal is None:
            self.fatal = exc
        self.stop.set()

    def add_worker(self, spec: ConsumerSpec, handler: Handler, **kwargs: Any) -> Worker:
        worker = Worker(self.js, spec, handler, on_fatal=self.fail, **kwargs)
        self.workers.append(worker)
        return worker

    def add_outbox(self, schema: str) -> OutboxRelay:
        relay = OutboxRelay(self.pool, self.js, schema)
        self.relays.append(relay)
        return relay

    def add_background(self, task: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
        """A long-running coroutine that returns once the given event is set."""
        self._background.append(task)

    def add_closer(self, closer: Callable[[], Awaitable[None]]) -> None:
        self._closers.append(closer)

    async def _connect(self, schema: str | None) -> None:
        if schema is not None:
            self._pool = await create_pool(
                self.common.database_url.get_secret_value(),
                min_size=self.common.db_pool_min,
                max_size=self.common.db_pool_max,
            )
            await migrate(self._pool, schema)
        try:
            self._nc = await nats.connect(
                servers=[self.common.nats_url],
                name=f"tandem-{self.name}",
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                connect_timeout=5,
            )
        except Exception as exc:
            raise FatalError(f"cannot connect to NATS at {self.common.nats_url}: {exc}") from exc
        self._js = self._nc.jetstream()
        await apply_topology(self._js, self.common.nats_stream_replicas)
        self.auth.bind(self._js)


SetUp = Callable[[Runtime], Awaitable[None]]


async def serve(name: str, own: ServiceSettings, setup: SetUp, *, schema: str | None) -> int:
    common = CommonSettings()
    configure_logging(name, common.log_level, common.log_format)
    rt = Runtime(name, common, own)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, rt.stop.set)

    ops = OpsServer(rt.health, common.bind_host, own.http_port)
    tasks: list[asyncio.Task[None]] = []
    relay_tasks: list[asyncio.Task[None]] = []
    try:
        await ops.start()
        rt.http_port = ops.port
        await rt._connect(schema)
        await setup(rt)
        health_pb2_grpc.add_HealthServicer_to_server(rt.grpc_health, rt.grpc_server)
        address = f"{common.bind_host}:{own.grpc_port}"
        credentials = common.grpc_server_credentials()
        rt.grpc_port = (
            rt.grpc_server.add_insecure_port(address)
            if credentials is None
            else rt.grpc_server.add_secure_port(address, credentials)
        )
        await rt.grpc_server.start()
        for relay in rt.relays:
            relay_tasks.append(asyncio.create_task(relay.run(rt.relay_stop), name=f"{name}-outbox"))
        for worker in rt.workers:
            tasks.append(asyncio.create_task(_guard(rt, worker.run()), name=f"{name}-{worker.name}"))
        for background in rt._background:
            tasks.append(asyncio.create_task(_guard(rt, background(rt.stop)), name=f"{name}-bg"))
        await rt.grpc_health.set("", health_pb2.HealthCheckResponse.SERVING)
        rt.health.set_ready()
        log.info("ready: grpc=%d http=%d", rt.grpc_port, rt.http_port)
        await rt.stop.wait()
    except FatalError as exc:
        rt.fail(exc)
    finally:
        await _drain(rt, ops, tasks, relay_tasks)
    if rt.fatal is not None:
        log.error("stopped on a fatal error: %s", rt.fatal)
        return 1
    log.info("stopped cleanly")
    return 0


async def _guard(rt: Runtime, coro: Coroutine[Any, Any, None]) -> None:
    try:
        await coro
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("a service task failed")
        rt.fail(exc)


async def _drain(
    rt: Runtime, ops: OpsServer, tasks: list[asyncio.Task[None]], relay_tasks: list[asyncio.Task[None]]
) -> None:
    grace = rt.common.drain_seconds
    rt.stop.set()
    rt.health.set_not_ready("draining")
    with contextlib.suppress(Exception):
        await rt.grpc_health.enter_graceful_shutdown()
    for worker in rt.workers:
        worker.stop_fetching()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(w.wait_idle() for w in rt.workers)), timeout=grace)
    # Workers leave their loop within one fetch timeout; background tasks watch `stop`.
    await _finish(tasks, grace)
    await rt.grpc_server.stop(grace=min(grace, 5.0))
    rt.relay_stop.set()
    await _finish(relay_tasks, grace)
    if rt._nc is not None and rt._nc.is_connected:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(rt._nc.drain(), timeout=grace)
    for closer in reversed(rt._closers):
        with contextlib.suppress(Exception):
            await closer()
    if rt._pool is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(rt._pool.close(), timeout=grace)
    await ops.stop()


async def _finish(tasks: list[asyncio.Task[None]], grace: float) -> None:
    if not tasks:
        return
    _done, pending = await asyncio.wait(tasks, timeout=grace)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def run(name: str, own: ServiceSettings, setup: SetUp, *, schema: str | None) -> None:
    """Entry point for `python -m services.<name>`."""
    sys.exit(asyncio.run(serve(name, own, setup, schema=schema)))
