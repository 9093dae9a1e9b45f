"""SQL of the export service (schema `export`)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import asyncpg

from services.export.service import SOURCE_RANK, RawLabel, source_name
from services.gen.tandem.items.v1 import items_pb2
from services.gen.tandem.labels.v1 import labels_pb2

SCHEMA = "export"


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


async def upsert_items(conn: asyncpg.Connection, items: Sequence[items_pb2.Item]) -> None:
    await conn.execute(
        "INSERT INTO export.items (item_id, project_id, external_id, text, metadata, synthetic, ingested_at)"
        " SELECT u.id, u.project, u.ext, u.txt, u.meta::jsonb, u.syn, u.ts"
        " FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::boolean[],"
        " $7::timestamptz[]) AS u(id, project, ext, txt, meta, syn, ts)"
        " ON CONFLICT (item_id) DO NOTHING",
        [it.item_id for it in items],
        [it.project_id for it in items],
        [it.external_id for it in items],
        [it.text for it in items],
        [json.dumps(dict(it.metadata)) for it in items],
        [it.synthetic for it in items],
        [_ts(it.ingested_unix_ms) for it in items],
    )


async def upsert_final_labels(
    conn: asyncpg.Connection, project_id: str, labels: Sequence[labels_pb2.FinalLabel]
) -> None:
    sources = [source_name(lb.source) for lb in labels]
    await conn.execute(
        "INSERT INTO export.final_labels (item_id, project_id, label, source, source_rank, confidence,"
        " model_version, annotator_ids, finalized_at, method)"
        " SELECT u.id, $2, u.label, u.source, u.rnk, u.conf, u.model, coalesce(string_to_array(u.annotators, ','), '{}'), u.ts,"
        " u.method"
        " FROM unnest($1::uuid[], $3::text[], $4::text[], $5::smallint[], $6::real[], $7::text[], $8::text[],"
        " $9::timestamptz[], $10::text[]) AS u(id, label, source, rnk, conf, model, annotators, ts, method)"
        " ON CONFLICT (item_id) DO UPDATE SET label = EXCLUDED.label, source = EXCLUDED.source,"
        " source_rank = EXCLUDED.source_rank, confidence = EXCLUDED.confidence,"
        " model_version = EXCLUDED.model_version, annotator_ids = EXCLUDED.annotator_ids,"
        " finalized_at = EXCLUDED.finalized_at, method = EXCLUDED.method, updated_at = now()"
        " WHERE EXCLUDED.source_rank >= export.final_labels.source_rank",
        [lb.item_id for lb in labels],
        project_id,
        [lb.label for lb in labels],
        sources,
        [SOURCE_RANK[s] for s in sources],
        [lb.confidence for lb in labels],
        [lb.model_version for lb in labels],
        [",".join(lb.annotator_ids) if lb.annotator_ids else None for lb in labels],
        [_ts(lb.finalized_unix_ms) for lb in labels],
        [lb.method for lb in labels],
    )


async def insert_raw_labels(conn: asyncpg.Connection, labels: Sequence[RawLabel]) -> None:
    """Store people's own labels; one already stored (a redelivery) is left as it is."""
    await conn.execute(
        "INSERT INTO export.raw_labels (item_id, project_id, task_id, annotator_id, pool_id, label, reason,"
        " seconds_spent, labeled_at, model_label, model_confidence)"
        " SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],"
        " $7::text[], $8::float8[], $9::timestamptz[], $10::text[], $11::real[])"
        " ON CONFLICT (item_id, task_id, annotator_id) DO NOTHING",
        [lb.item_id for lb in labels],
        [lb.project_id for lb in labels],
        [lb.task_id for lb in labels],
        [lb.annotator_id for lb in labels],
        [lb.pool_id for lb in labels],
        [lb.label for lb in labels],
        [lb.reason for lb in labels],
        [lb.seconds_spent for lb in labels],
        [lb.labeled_at for lb in labels],
        [lb.model_label for lb in labels],
        [lb.model_confidence for lb in labels],
    )


async def create_snapshot(conn: asyncpg.Connection, project_id: str, fmt: str = "jsonl") -> asyncpg.Record:
    export_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO export.exports (export_id, project_id, rows, pending, rows_by_source, format)"
        " VALUES ($1, $2, 0, 0, '{}', $3)",
        export_id,
        project_id,
        fmt,
    )
    # The counts by source come from the rows as they are inserted: exact for this snapshot, and
    # no second read of the (large, just written) lines.
    counted = await conn.fetch(
        "WITH ins AS (INSERT INTO export.export_rows (export_id, item_id, line)"
        " SELECT $1, i.item_id, jsonb_build_object("
        "  'id', i.external_id, 'item_id', i.item_id, 'text', i.text, 'label', f.label, 'source', f.source,"
        "  'confidence', f.confidence, 'model_version', f.model_version, 'annotator_ids', f.annotator_ids,"
        "  'below_target', f.source = 'model', 'synthetic', i.synthetic, 'metadata', i.metadata,"
        "  'ingested_at', i.ingested_at,"
        "  'finalized_at', f.finalized_at,"
        "  'aggregation', f.method, 'posterior', f.confidence, 'raw_labels', r.raw_labels)"
        " FROM export.items i JOIN export.final_labels f USING (item_id)"
        # An aggregate without GROUP BY yields one row even for an item nobody labeled (an empty
        # list then), so every item keeps its line; each item's labels are one index range scan.
        " CROSS JOIN LATERAL (SELECT coalesce(jsonb_agg(jsonb_build_object("
        "  'annotator_id', rl.annotator_id, 'pool_id', rl.pool_id, 'label', rl.label,"
        "  'labeled_at', rl.labeled_at, 'reason', rl.reason, 'model_label', rl.model_label,"
        "  'model_confidence', rl.model_confidence) ORDER BY rl.labeled_at, rl.annotator_id),"
        "  '[]'::jsonb) AS raw_labels FROM export.raw_labels rl WHERE rl.item_id = i.item_id) r"
        " WHERE i.project_id = $2"
        " RETURNING line->>'source' AS source)"
        " SELECT source, count(*) AS n FROM ins GROUP BY 1",
        export_id,
        project_id,
    )
    by_source = {r["source"]: r["n"] for r in counted}
    pending = await conn.fetchval(
        "SELECT count(*) FROM export.items i WHERE i.project_id = $1"
        " AND NOT EXISTS (SELECT 1 FROM export.final_labels f WHERE f.item_id = i.item_id)",
        project_id,
    )
    row = await conn.fetchrow(
        "UPDATE export.exports SET rows = $2, pending = $3, rows_by_source = $4 WHERE export_id = $1 RETURNING *",
        export_id,
        sum(by_source.values()),
        pending,
        json.dumps(by_source),
    )
    assert row is not None
    return row


async def split_inputs(conn: asyncpg.Connection, export_id: uuid.UUID) -> list[tuple[str, str, str]]:
    """(item_id, text, label) of every row of a snapshot, what a split is decided on."""
    rows = await conn.fetch(
        "SELECT item_id::text AS item_id, line->>'text' AS text, line->>'label' AS label"
        " FROM export.export_rows WHERE export_id = $1",
        export_id,
    )
    return [(r["item_id"], r["text"], r["label"]) for r in rows]


async def set_splits(
    conn: asyncpg.Connection, export_id: uuid.UUID, splits: dict[str, str]
) -> asyncpg.Record:
    """Write each row's split into its line (every format then carries it) and the counts."""
    await conn.execute(
        "UPDATE export.export_rows r SET line = r.line || jsonb_build_object('split', u.split)"
        " FROM unnest($2::uuid[], $3::text[]) AS u(id, split) WHERE r.export_id = $1 AND r.item_id = u.id",
        export_id,
        list(splits),
        list(splits.values()),
    )
    counts: dict[str, int] = {}
    for split in splits.values():
        counts[split] = counts.get(split, 0) + 1
    row = await conn.fetchrow(
        "UPDATE export.exports SET rows_by_split = $2 WHERE export_id = $1 RETURNING *",
        export_id,
        json.dumps(counts),
    )
    assert row is not None
    return row


async def delete_exports_before(conn: asyncpg.Connection, cutoff: datetime) -> int:
    """Delete the snapshots created before `cutoff` (their rows go with them, ON DELETE CASCADE).
    A stream already reading one keeps its own view of the rows until it ends."""
    deleted = await conn.fetch("DELETE FROM export.exports WHERE created_at < $1 RETURNING 1", cutoff)
    return len(deleted)


async def get_export(conn: asyncpg.Connection, export_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM export.exports WHERE export_id = $1", uuid.UUID(export_id))


async def stream_lines(
    conn: asyncpg.Connection, export_id: str, prefetch: int, *, metadata_as_text: bool = False
) -> AsyncIterator[str]:
    """The snapshot's lines in item order, read through a server-side cursor (bounded memory).

    metadata_as_text: each line's metadata as a JSON string instead of an object, the shape the
    Parquet column has, so Arrow's JSON reader can take the lines as they come.
    """
    line = (
        "(line || jsonb_build_object('metadata', (line->'metadata')::text))" if metadata_as_text else "line"
    )
    async with conn.transaction():
        async for row in conn.cursor(
            f"SELECT {line}::text AS line FROM export.export_rows WHERE export_id = $1 ORDER BY item_id",
            uuid.UUID(export_id),
            prefetch=prefetch,
        ):
            yield row["line"]


async def stats(conn: asyncpg.Connection, project_id: str) -> tuple[int, dict[str, int], datetime | None]:
    items = await conn.fetchval("SELECT count(*) FROM export.items WHERE project_id = $1", project_id)
    rows = await conn.fetch(
        "SELECT f.source, count(*) AS n, max(f.finalized_at) AS last FROM export.final_labels f"
        " JOIN export.items i USING (item_id) WHERE f.project_id = $1 GROUP BY f.source",
        project_id,
    )
    last = max((r["last"] for r in rows), default=None)
    return items, {r["source"]: r["n"] for r in rows}, last
