"""PostgreSQL pool and schema migrations.

Each service owns one schema and its migrations live in `migrations/<schema>/NNNN_*.sql`.
They run at start-up under an advisory lock, so replicas starting together apply them once.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import asyncpg

from services.common.errors import FatalError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 8) -> asyncpg.Pool:
    try:
        pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, command_timeout=60)
    except (OSError, asyncpg.PostgresError) as exc:
        raise FatalError(f"cannot connect to PostgreSQL: {exc}") from exc
    assert pool is not None
    return pool


async def migrate(pool: asyncpg.Pool, schema: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply the schema's pending migrations in order; returns the versions applied."""
    folder = directory / schema
    files = sorted(folder.glob("*.sql"))
    if not files:
        raise FatalError(f"no migrations found in {folder}")
    applied: list[str] = []
    lock_key = zlib.crc32(f"tandem-migrate-{schema}".encode())
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", lock_key)
        try:
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {schema}.schema_migrations "
                "(version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch(f"SELECT version FROM {schema}.schema_migrations")}
            for path in files:
                if path.stem in done:
                    continue
                async with conn.transaction():
                    await conn.execute(path.read_text(encoding="utf-8"))
                    await conn.execute(
                        f"INSERT INTO {schema}.schema_migrations (version) VALUES ($1)", path.stem
                    )
                applied.append(path.stem)
                log.info("applied migration %s/%s", schema, path.name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", lock_key)
    return applied
