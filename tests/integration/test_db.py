"""Schema migrations against a real PostgreSQL, and the local PostgreSQL helper itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from services.cli.stack import LocalPostgres, StackError, pid_alive
from services.common.db import create_pool, migrate
from services.common.errors import FatalError

pytestmark = pytest.mark.integration

SCHEMA = "demo"


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def migrations(tmp_path: Path) -> Path:
    folder = tmp_path / "migrations" / SCHEMA
    folder.mkdir(parents=True)
    # 0010 needs the table 0002 creates: applying out of order fails.
    (folder / "0002_create.sql").write_text(f"CREATE TABLE {SCHEMA}.notes (id int PRIMARY KEY);")
    (folder / "0010_column.sql").write_text(
        f"ALTER TABLE {SCHEMA}.notes ADD COLUMN body text; INSERT INTO {SCHEMA}.notes VALUES (1, 'a');"
    )
    return folder.parent


async def applied_versions(pool: asyncpg.Pool) -> list[str]:
    rows = await pool.fetch(f"SELECT version FROM {SCHEMA}.schema_migrations ORDER BY applied_at, version")
    return [r["version"] for r in rows]


async def test_migrate_applies_in_order_once(pool: asyncpg.Pool, migrations: Path) -> None:
    assert await migrate(pool, SCHEMA, migrations) == ["0002_create", "0010_column"]
    assert await migrate(pool, SCHEMA, migrations) == []

    assert await applied_versions(pool) == ["0002_create", "0010_column"]
    assert await pool.fetchval(f"SELECT count(*) FROM {SCHEMA}.notes") == 1

    (migrations / SCHEMA / "0011_more.sql").write_text(f"INSERT INTO {SCHEMA}.notes VALUES (2, 'b');")
    assert await migrate(pool, SCHEMA, migrations) == ["0011_more"]
    assert await pool.fetchval(f"SELECT count(*) FROM {SCHEMA}.notes") == 2


async def test_concurrent_migrations_apply_once(database_url: str, migrations: Path) -> None:
    # Slow enough that both replicas are inside migrate() at the same time.
    (migrations / SCHEMA / "0001_wait.sql").write_text("SELECT pg_sleep(0.3);")
    pools = [await create_pool(database_url, min_size=1, max_size=2) for _ in range(2)]
    try:
        results = await asyncio.gather(*(migrate(p, SCHEMA, migrations) for p in pools))
        assert sorted(results, key=len) == [[], ["0001_wait", "0002_create", "0010_column"]]
        assert await pools[0].fetchval(f"SELECT count(*) FROM {SCHEMA}.notes") == 1
    finally:
        for p in pools:
            await p.close()


async def test_failed_migration_is_not_recorded(pool: asyncpg.Pool, migrations: Path) -> None:
    broken = migrations / SCHEMA / "0011_broken.sql"
    broken.write_text(f"INSERT INTO {SCHEMA}.notes VALUES (2, 'b'); SELECT * FROM no_such_table;")
    with pytest.raises(asyncpg.UndefinedTableError):
        await migrate(pool, SCHEMA, migrations)
    assert await applied_versions(pool) == ["0002_create", "0010_column"]
    assert await pool.fetchval(f"SELECT count(*) FROM {SCHEMA}.notes") == 1

    # The advisory lock was released: a fixed file applies on the next start.
    broken.write_text(f"INSERT INTO {SCHEMA}.notes VALUES (2, 'b');")
    assert await asyncio.wait_for(migrate(pool, SCHEMA, migrations), timeout=10) == ["0011_broken"]


async def test_missing_migrations_are_fatal(pool: asyncpg.Pool, tmp_path: Path) -> None:
    with pytest.raises(FatalError, match="no migrations"):
        await migrate(pool, SCHEMA, tmp_path)


async def test_local_postgres_keeps_data_across_restarts(tmp_path: Path) -> None:
    server = LocalPostgres(tmp_path / "pgdata", keep_data=True)
    await asyncio.to_thread(server.start)
    try:
        url = server.create_database("tandem")
        assert server.create_database("tandem", exist_ok=True) == url
        with pytest.raises(StackError, match="already exists"):
            server.create_database("tandem")
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("CREATE TABLE kept (id int); INSERT INTO kept VALUES (7)")
        finally:
            await conn.close()
        first_pid = server.pid
        assert first_pid is not None
    finally:
        await asyncio.to_thread(server.stop)
    assert not pid_alive(first_pid)
    with pytest.raises(StackError):
        _ = server.url

    restarted = LocalPostgres(tmp_path / "pgdata", keep_data=True)
    await asyncio.to_thread(restarted.start)
    try:
        conn = await asyncpg.connect(restarted.create_database("tandem", exist_ok=True))
        try:
            assert await conn.fetchval("SELECT id FROM kept") == 7
        finally:
            await conn.close()
        pid = restarted.pid
        assert pid is not None
    finally:
        await asyncio.to_thread(restarted.stop)
    assert not pid_alive(pid)


def test_database_names_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="database name"):
        LocalPostgres(tmp_path).create_database('x"; DROP DATABASE postgres; --')
