"""Real nats-server and PostgreSQL for the integration and end-to-end tiers.

By default both run locally from their wheels. `--nats-url` / `--database-url` point the tests
at servers that already run instead (a CI service container, a developer's own server).

Isolation: every test gets its own JetStream (the topology has fixed stream names, so sharing a
server would leak streams and consumers between tests) and its own database.
"""

from __future__ import annotations

import os

# The tests start servers with subprocesses from a process whose gRPC threads are running (pgserver
# forks to run pg_ctl as its own user): gRPC's fork handlers are not wanted there (a child once
# died in them), and nothing forked here uses gRPC. Read when grpc is first imported, so first.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from services.cli.stack import LocalNats, LocalPostgres, database_url_for


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tandem", "Tandem test servers")
    group.addoption(
        "--nats-url",
        default=None,
        help="use this nats-server (JetStream enabled) instead of starting one; "
        "every stream on it is deleted before each test that uses it",
    )
    group.addoption(
        "--database-url",
        default=None,
        help="use this PostgreSQL server (a superuser URL) instead of starting one; "
        "tests create and drop their own databases on it",
    )


@pytest.fixture(scope="session")
def nats_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """URL of one nats-server shared by the session (the option's, or a local one)."""
    external: str | None = request.config.getoption("--nats-url")
    if external:
        yield external
        return
    root = Path(tempfile.mkdtemp(prefix="tandem-nats-"))  # outside basetemp, as for PostgreSQL
    try:
        with LocalNats(root) as server:
            yield server.url
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """URL of the maintenance database of one PostgreSQL server shared by the session."""
    external: str | None = request.config.getoption("--database-url")
    if external:
        yield external
        return
    # Not under pytest's basetemp: pytest deletes all but the newest three of those when another
    # session starts, and a postmaster whose data directory vanishes shuts itself down.
    root = Path(tempfile.mkdtemp(prefix="tandem-pg-"))
    try:
        with LocalPostgres(root / "pgdata", keep_data=False) as server:
            yield server.url
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def _wipe_jetstream(url: str) -> None:
    nc = await nats.connect(url, connect_timeout=5)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            assert info.config.name is not None
            await js.delete_stream(info.config.name)
    finally:
        await nc.close()


@pytest.fixture
async def nats_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A JetStream with no streams: a fresh local nats-server (~50 ms), or the wiped external one."""
    external: str | None = request.config.getoption("--nats-url")
    if external:
        await _wipe_jetstream(external)
        yield external
        return
    server = await asyncio.to_thread(LocalNats(tmp_path / "nats").start)
    try:
        yield server.url
    finally:
        await asyncio.to_thread(server.stop)


@pytest.fixture
async def database_url(postgres_server: str) -> AsyncIterator[str]:
    """URL of an empty database created for this test and dropped after it."""
    name = f"t_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(postgres_server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield database_url_for(postgres_server, name)
    admin = await asyncpg.connect(postgres_server)
    try:
        # FORCE: a pool the test left open must not keep the database alive.
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NatsClient]:
    client = await nats.connect(nats_url, connect_timeout=5)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def js(nc: NatsClient) -> JetStreamContext:
    return nc.jetstream()
