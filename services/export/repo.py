"""SQL of the export service (schema `export`)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg

from services.export.service import SOURCE_RANK, ExportFilter, RawLabel, source_name
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


# The line of an export row: keep it as it is, whatever the format streamed (formats are encoded
# from it) — a changed line changes every checksum.
_LINE_FROM = (
    " SELECT $1, i.item_id, jsonb_build_object("
    "  'id', i.external_id, 'item_id', i.item_id, 'text', i.text, 'label', f.label, 'source', f.source,"
    "  'confidence', f.confidence, 'model_version', f.model_version, 'annotator_ids', f.annotator_ids,"
    "  'below_target', f.source = 'model', 'synthetic', i.synthetic, 'metadata', i.metadata,"
    "  'ingested_at', i.ingested_at,"
    "  'finalized_at', f.finalized_at,"
    "  'aggregation', f.method, 'posterior', f.confidence, 'raw_labels', r.raw_labels,"
    "  'labeler', p.labeler)"
    " FROM export.items i JOIN export.final_labels f USING (item_id)"
    # The labeler's model id, prompt hash and distribution (null where no prediction came).
    " LEFT JOIN export.predictions p USING (item_id)"
    # An aggregate without GROUP BY yields one row even for an item nobody labeled (an empty
    # list then), so every item keeps its line; each item's labels are one index range scan.
    " CROSS JOIN LATERAL (SELECT coalesce(jsonb_agg(jsonb_build_object("
    "  'annotator_id', rl.annotator_id, 'pool_id', rl.pool_id, 'label', rl.label,"
    "  'labeled_at', rl.labeled_at, 'reason', rl.reason, 'model_label', rl.model_label,"
    "  'model_confidence', rl.model_confidence) ORDER BY rl.labeled_at, rl.annotator_id),"
    "  '[]'::jsonb) AS raw_labels FROM export.raw_labels rl WHERE rl.item_id = i.item_id) r"
)


def _filter_sql(f: ExportFilter, first: int) -> tuple[str, list[Any]]:
    """The filter's conditions on `i` (items) and `f` (final labels), AND-ed, with their
    parameters numbered from `first`."""
    conds: list[str] = []
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${first + len(args) - 1}"

    if f.sources:
        conds.append(f"f.source = ANY({arg(list(f.sources))}::text[])")
    if f.min_confidence > 0:
        # As real, the column's type: 0.9 as a double is above the stored real 0.9.
        conds.append(f"f.confidence >= {arg(f.min_confidence)}::real")
    if f.finalized_after_ms:
        conds.append(f"f.finalized_at >= {arg(_ts(f.finalized_after_ms))}")
    if f.finalized_before_ms:
        conds.append(f"f.finalized_at < {arg(_ts(f.finalized_before_ms))}")
    if f.metadata:
        conds.append(f"i.metadata @> {arg(json.dumps(dict(f.metadata)))}::jsonb")
    if f.certified_only:
        conds.append("f.source <> 'model'")
    return "".join(" AND " + c for c in conds), args


async def create_export(
    conn: asyncpg.Connection,
    export_id: uuid.UUID,
    project_id: str,
    fmt: str,
    f: ExportFilter,
    retention_hours: float,
) -> asyncpg.Record:
    """The export's row, state 'building', with the project's next version."""
    async with conn.transaction():
        # The counter's row lock orders concurrent creations of a project: versions 1, 2, ...
        version = await conn.fetchval(
            "INSERT INTO export.export_versions AS v (project_id, last) VALUES ($1, 1)"
            " ON CONFLICT (project_id) DO UPDATE SET last = v.last + 1 RETURNING last",
            project_id,
        )
        row = await conn.fetchrow(
            "INSERT INTO export.exports (export_id, project_id, rows, pending, rows_by_source, format,"
            " state, version, filter, expires_at)"
            " VALUES ($1, $2, 0, 0, '{}', $3, 'building', $4, $5::jsonb,"
            "  CASE WHEN $6::float8 > 0 THEN now() + make_interval(secs => $6::float8 * 3600) END)"
            " RETURNING *",
            export_id,
            project_id,
            fmt,
            version,
            json.dumps(f.to_json()),
            retention_hours,
        )
    assert row is not None
    return row


async def count_rows(conn: asyncpg.Connection, project_id: str, f: ExportFilter) -> tuple[int, int]:
    """(rows the filter keeps, the project's items without a final label)."""
    where, args = _filter_sql(f, 2)
    total = await conn.fetchval(
        "SELECT count(*) FROM export.items i JOIN export.final_labels f USING (item_id)"
        " WHERE i.project_id = $1" + where,
        project_id,
        *args,
    )
    pending = await conn.fetchval(
        "SELECT count(*) FROM export.items i WHERE i.project_id = $1"
        " AND NOT EXISTS (SELECT 1 FROM export.final_labels f WHERE f.item_id = i.item_id)",
        project_id,
    )
    return total, pending


async def copy_page(
    conn: asyncpg.Connection,
    export_id: uuid.UUID,
    project_id: str,
    f: ExportFilter,
    after: uuid.UUID | None,
    limit: int,
) -> tuple[uuid.UUID | None, dict[str, int]]:
    """Copy the next `limit` rows after item `after` (keyset, in item order) into the snapshot.
    Returns the last item copied (None when nothing was left) and the rows copied by source."""
    where, args = _filter_sql(f, 5)
    # The counts come from the rows as they are inserted: no second read of the written lines.
    row = await conn.fetchrow(
        "WITH ins AS (INSERT INTO export.export_rows (export_id, item_id, line)"
        + _LINE_FROM
        + " WHERE i.project_id = $2 AND ($3::uuid IS NULL OR i.item_id > $3::uuid)"
        + where
        + " ORDER BY i.item_id LIMIT $4"
        " RETURNING item_id, line->>'source' AS source)"
        " SELECT (SELECT item_id FROM ins ORDER BY item_id DESC LIMIT 1) AS last,"
        " (SELECT coalesce(jsonb_object_agg(source, n), '{}') FROM"
        "  (SELECT source, count(*) AS n FROM ins GROUP BY source) c) AS by_source",
        export_id,
        project_id,
        after,
        limit,
        *args,
    )
    assert row is not None
    return row["last"], json.loads(row["by_source"])


async def set_rows_done(conn: asyncpg.Connection, export_id: uuid.UUID, rows_done: int) -> None:
    await conn.execute("UPDATE export.exports SET rows_done = $2 WHERE export_id = $1", export_id, rows_done)


async def set_counts(conn: asyncpg.Connection, export_id: uuid.UUID, rows_total: int, pending: int) -> None:
    # `rows` too: a caller that reads ExportInfo.rows from CreateExport (before jobs) gets the
    # count the snapshot will have.
    await conn.execute(
        "UPDATE export.exports SET rows_total = $2, rows = $2, pending = $3 WHERE export_id = $1",
        export_id,
        rows_total,
        pending,
    )


async def split_inputs(conn: asyncpg.Connection, export_id: uuid.UUID) -> list[tuple[str, str, str]]:
    """(item_id, text, label) of every row of a snapshot, what a split is decided on."""
    rows = await conn.fetch(
        "SELECT item_id::text AS item_id, line->>'text' AS text, line->>'label' AS label"
        " FROM export.export_rows WHERE export_id = $1",
        export_id,
    )
    return [(r["item_id"], r["text"], r["label"]) for r in rows]


async def write_splits(conn: asyncpg.Connection, export_id: uuid.UUID, splits: dict[str, str]) -> None:
    """Write each row's split into its line: every format then carries it."""
    await conn.execute(
        "UPDATE export.export_rows r SET line = r.line || jsonb_build_object('split', u.split)"
        " FROM unnest($2::uuid[], $3::text[]) AS u(id, split) WHERE r.export_id = $1 AND r.item_id = u.id",
        export_id,
        list(splits),
        list(splits.values()),
    )


async def finish_export(
    conn: asyncpg.Connection,
    export_id: uuid.UUID,
    by_source: dict[str, int],
    by_split: dict[str, int],
    checksum: str,
) -> asyncpg.Record:
    rows = sum(by_source.values())
    row = await conn.fetchrow(
        "UPDATE export.exports SET state = 'ready', rows = $2, rows_total = $2, rows_done = $2,"
        " rows_by_source = $3, rows_by_split = $4, checksum = $5, ready_at = now()"
        " WHERE export_id = $1 RETURNING *",
        export_id,
        rows,
        json.dumps(by_source),
        json.dumps(by_split),
        checksum,
    )
    assert row is not None
    return row


async def fail_export(conn: asyncpg.Connection, export_id: uuid.UUID, error: str) -> None:
    await conn.execute(
        "UPDATE export.exports SET state = 'failed', error = $2 WHERE export_id = $1 AND state = 'building'",
        export_id,
        error,
    )


# Advisory lock keys of export jobs: (namespace, hash of the export id). A job holds its export's
# lock (on its connection's session) from before the row is committed until the state is final, so
# an export 'building' whose lock is free was left by a process that stopped.
_JOB_LOCK = "hashtext('tandem-export-job'), hashtext($1::uuid::text)"


async def lock_job(conn: asyncpg.Connection, export_id: uuid.UUID) -> None:
    await conn.execute(f"SELECT pg_advisory_lock({_JOB_LOCK})", export_id)


async def unlock_job(conn: asyncpg.Connection, export_id: uuid.UUID) -> None:
    await conn.execute(f"SELECT pg_advisory_unlock({_JOB_LOCK})", export_id)


async def fail_abandoned_jobs(conn: asyncpg.Connection, error: str) -> int:
    """Mark failed the exports left 'building' by a process that stopped (their job's lock is
    free); a job running in any replica keeps its lock, and its export."""
    abandoned = 0
    for row in await conn.fetch("SELECT export_id FROM export.exports WHERE state = 'building'"):
        async with conn.transaction():
            # The transaction's lock only tests the job's session lock; it goes at commit.
            if await conn.fetchval(
                "SELECT pg_try_advisory_xact_lock(hashtext('tandem-export-job'), hashtext($1::uuid::text))",
                row["export_id"],
            ):
                status = await conn.execute(
                    "UPDATE export.exports SET state = 'failed', error = $2"
                    " WHERE export_id = $1 AND state = 'building'",
                    row["export_id"],
                    error,
                )
                abandoned += status == "UPDATE 1"
    return abandoned


async def delete_exports_before(conn: asyncpg.Connection, cutoff: datetime | None) -> int:
    """Delete the snapshots past the expiry they were made with, or created before `cutoff` (the
    retention now; None: forever). Their rows go with them (ON DELETE CASCADE); a job still
    building is left alone. A stream already reading one keeps its own view of the rows until it
    ends."""
    deleted = await conn.fetch(
        "DELETE FROM export.exports WHERE state <> 'building'"
        " AND (expires_at <= now() OR created_at < $1) RETURNING 1",
        cutoff,
    )
    return len(deleted)


async def list_exports(conn: asyncpg.Connection, project_id: str, limit: int) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT * FROM export.exports WHERE project_id = $1 ORDER BY version DESC LIMIT $2",
        project_id,
        limit,
    )
    return rows


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


async def replace_slice_flags(
    conn: asyncpg.Connection,
    project_id: str,
    fields: Sequence[str],
    flagged: Sequence[tuple[str, str, list[str]]],
) -> dict[tuple[str, str], int]:
    """A report's flags for the fields it covered, (field, value, reasons): a slice still flagged
    keeps the time it was first flagged, one no longer flagged is dropped. Returns (field, value) →
    flagged since (unix ms) for the slices flagged now."""
    await conn.execute(
        "DELETE FROM export.slice_flags f WHERE f.project_id = $1 AND f.field = ANY($2::text[])"
        " AND (f.field, f.value) NOT IN (SELECT * FROM unnest($3::text[], $4::text[]))",
        project_id,
        list(fields),
        [f for f, _, _ in flagged],
        [v for _, v, _ in flagged],
    )
    since: dict[tuple[str, str], int] = {}
    for f, v, reasons in flagged:
        at = await conn.fetchval(
            "INSERT INTO export.slice_flags (project_id, field, value, reasons) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (project_id, field, value) DO UPDATE SET reasons = EXCLUDED.reasons"
            " RETURNING flagged_at",
            project_id,
            f,
            v,
            reasons,
        )
        since[(f, v)] = int(at.timestamp() * 1000)
    return since


async def upsert_predictions(
    conn: asyncpg.Connection, project_id: str, rows: Sequence[tuple[str, dict[str, object]]], at: datetime
) -> None:
    """The labeler's output per item, (item id, {"model_id", "prompt_hash", "distribution"}); a
    redelivery or a re-prediction replaces it."""
    await conn.execute(
        "INSERT INTO export.predictions (item_id, project_id, labeler, predicted_at)"
        " SELECT u.id, $2, u.labeler::jsonb, $4 FROM unnest($1::uuid[], $3::text[]) AS u(id, labeler)"
        " ON CONFLICT (item_id) DO UPDATE SET labeler = EXCLUDED.labeler, predicted_at = EXCLUDED.predicted_at",
        [item_id for item_id, _ in rows],
        project_id,
        [json.dumps(labeler) for _, labeler in rows],
        at,
    )
