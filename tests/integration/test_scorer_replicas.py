"""Two scorer replicas on one stack: each project is decided by exactly one of them (a PostgreSQL
advisory lock per project, services/scorer/leases.py), and a kill -9 of the one deciding a project
hands it to the other without losing an item."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from services.cli.client import Clients
from services.cli.stack import ServiceProcess, Stack
from tests.integration.test_scorer import ENV, World, _eventually, _predict, _project

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

PROJECTS = ("rep-a", "rep-b", "rep-c", "rep-d")
PER_BATCH = 20


@pytest.fixture
async def replicas(
    tmp_path: Path, nats_url: str, database_url: str
) -> AsyncIterator[tuple[Stack, ServiceProcess, Clients]]:
    stack = Stack(
        tmp_path / "state",
        nats_url=nats_url,
        database_url=database_url,
        services=("ingest", "scorer"),
        extra_env=ENV,
    )
    await asyncio.to_thread(stack.start)
    second = ServiceProcess(
        "scorer", nats_url=nats_url, database_url=database_url, log_dir=tmp_path / "second", env=ENV
    )
    try:
        await asyncio.to_thread(second.start)
        await asyncio.to_thread(second.wait_ready, 60)
        async with Clients(
            {
                **stack.targets,
                "inference": stack.targets["ingest"],
                "review": stack.targets["ingest"],
                "export": stack.targets["ingest"],
            },
            token=stack.admin_token,
        ) as clients:
            yield stack, second, clients
    finally:
        if second.running:
            await asyncio.to_thread(second.terminate)
        await asyncio.to_thread(stack.stop)


def _deciders(path: Path) -> set[str]:
    """Projects a replica's log says it took (leases.py logs each one)."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    return set(re.findall(r"this scorer now decides (\S+)", text))


async def _decided(database_url: str, project: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        n: int = await conn.fetchval("SELECT count(*) FROM scorer.items WHERE project_id = $1", project)
    finally:
        await conn.close()
    return n


async def test_each_project_has_one_scorer_and_a_killed_one_hands_over(
    replicas: tuple[Stack, ServiceProcess, Clients], database_url: str
) -> None:
    stack, second, clients = replicas
    first = stack.processes["scorer"]
    world = World(seed=3)
    truth: dict[str, int] = {}
    for name in PROJECTS:
        await _project(clients, name, audit_rate=0.1)
    for _ in range(3):  # several batches per project: both replicas get some of each
        for name in PROJECTS:
            await _predict(stack, world, name, world.labeled(PER_BATCH, truth))
    for name in PROJECTS:
        await _eventually(_has(database_url, name, 3 * PER_BATCH), f"{name} decided", within=240)

    a, b = _deciders(first.log_path), _deciders(second.log_path)
    assert a | b == set(PROJECTS)
    assert not a & b, f"projects decided by both replicas: {a & b}"

    # Kill -9 the replica deciding rep-a: the other takes it over, and nothing is lost.
    owner, survivor = (first, second) if "rep-a" in a else (second, first)
    owner.kill()
    await _predict(stack, world, "rep-a", world.labeled(PER_BATCH, truth))
    await _eventually(_has(database_url, "rep-a", 4 * PER_BATCH), "rep-a after the kill", within=240)
    assert "rep-a" in _deciders(survivor.log_path)


def _has(database_url: str, project: str, n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await _decided(database_url, project) >= n

    return check
