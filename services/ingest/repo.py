"""SQL of the ingest service (schema `ingest`)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg

from services.common.bus.outbox import Outgoing, enqueue
from services.gen.tandem.projects.v1 import projects_pb2
from services.ingest.service import Rejection, ValidItem

SCHEMA = "ingest"


async def insert_project(conn: asyncpg.Connection, project: projects_pb2.Project) -> bool:
    row = await conn.fetchrow(
        "INSERT INTO ingest.projects (project_id, spec) VALUES ($1, $2) "
        "ON CONFLICT (project_id) DO NOTHING RETURNING project_id",
        project.project_id,
        project.SerializeToString(),
    )
    if row is not None:
        await conn.execute("INSERT INTO ingest.project_counters (project_id) VALUES ($1)", project.project_id)
    return row is not None


async def update_project(conn: asyncpg.Connection, project: projects_pb2.Project) -> None:
    await conn.execute(
        "UPDATE ingest.projects SET spec = $2 WHERE project_id = $1",
        project.project_id,
        project.SerializeToString(),
    )


async def lock_project(conn: asyncpg.Connection, project_id: str) -> projects_pb2.Project | None:
    data = await conn.fetchval(
        "SELECT spec FROM ingest.projects WHERE project_id = $1 FOR UPDATE", project_id
    )
    return None if data is None else projects_pb2.Project.FromString(data)


async def get_project(conn: asyncpg.Connection, project_id: str) -> projects_pb2.Project | None:
    data = await conn.fetchval("SELECT spec FROM ingest.projects WHERE project_id = $1", project_id)
    if data is None:
        return None
    project = projects_pb2.Project()
    project.ParseFromString(data)
    return project


async def list_projects(conn: asyncpg.Connection) -> list[projects_pb2.Project]:
    out = []
    for row in await conn.fetch("SELECT spec FROM ingest.projects ORDER BY project_id"):
        project = projects_pb2.Project()
        project.ParseFromString(row["spec"])
        out.append(project)
    return out


async def existing_projects(conn: asyncpg.Connection, project_ids: Sequence[str]) -> set[str]:
    rows = await conn.fetch(
        "SELECT project_id FROM ingest.projects WHERE project_id = ANY($1::text[])", list(set(project_ids))
    )
    return {r["project_id"] for r in rows}


async def insert_items(conn: asyncpg.Connection, items: Sequence[ValidItem], now: datetime) -> dict[int, str]:
    """COPY the items into a staging table, then insert the new ones.

    Returns request index → item id for the items actually inserted; the others are
    duplicates of an item already stored (or of an earlier item in the same request).
    """
    if not items:
        return {}
    await conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS incoming_items (idx integer, item_id uuid, project_id text, "
        "external_id text, content_hash text, text text, metadata jsonb, synthetic boolean) ON COMMIT DELETE ROWS"
    )
    await conn.copy_records_to_table(
        "incoming_items",
        records=[
            (
                it.index,
                uuid.uuid4(),
                it.project_id,
                it.external_id,
                it.content_hash,
                it.text,
                json.dumps(it.metadata),
                it.synthetic,
            )
            for it in items
        ],
    )
    rows = await conn.fetch(
        "WITH ins AS ("
        " INSERT INTO ingest.items (item_id, project_id, external_id, content_hash, text, metadata, synthetic,"
        "  ingested_at)"
        " SELECT DISTINCT ON (project_id, content_hash) item_id, project_id, external_id, content_hash, text,"
        "  metadata, synthetic, $1 FROM incoming_items ORDER BY project_id, content_hash, idx"
        " ON CONFLICT (project_id, content_hash) DO NOTHING RETURNING item_id)"
        " SELECT i.idx, i.item_id FROM incoming_items i JOIN ins USING (item_id)",
        now,
    )
    return {r["idx"]: str(r["item_id"]) for r in rows}


async def existing_ids(conn: asyncpg.Connection, project_id: str, hashes: Sequence[str]) -> dict[str, str]:
    rows = await conn.fetch(
        "SELECT content_hash, item_id FROM ingest.items WHERE project_id = $1 AND content_hash = ANY($2::text[])",
        project_id,
        list(hashes),
    )
    return {r["content_hash"]: str(r["item_id"]) for r in rows}


async def record_rejections(conn: asyncpg.Connection, rejections: Sequence[Rejection]) -> None:
    if not rejections:
        return
    await conn.executemany(
        "INSERT INTO ingest.rejections (project_id, external_id, reason, raw) VALUES ($1, $2, $3, $4)",
        [(r.project_id, r.external_id, r.reason, r.raw[: 64 * 1024]) for r in rejections],
    )


async def bump_counters(conn: asyncpg.Connection, project_id: str, duplicates: int, rejected: int) -> None:
    if duplicates or rejected:
        await conn.execute(
            "UPDATE ingest.project_counters SET duplicates = duplicates + $2, rejected = rejected + $3 "
            "WHERE project_id = $1",
            project_id,
            duplicates,
            rejected,
        )


async def publish(conn: asyncpg.Connection, outgoing: Sequence[Outgoing]) -> None:
    await enqueue(conn, SCHEMA, outgoing)


async def stats(conn: asyncpg.Connection, project_id: str) -> tuple[int, int, int, datetime | None]:
    row = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM ingest.items WHERE project_id = $1) AS items,"
        " (SELECT min(ingested_at) FROM ingest.items WHERE project_id = $1) AS first,"
        " c.duplicates, c.rejected FROM ingest.project_counters c WHERE c.project_id = $1",
        project_id,
    )
    if row is None:
        return 0, 0, 0, None
    return row["items"], row["duplicates"], row["rejected"], row["first"]


def utcnow() -> datetime:
    return datetime.now(UTC)
