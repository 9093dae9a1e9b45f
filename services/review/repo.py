"""SQL of the review service (schema `review`)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

import asyncpg

from services.common.bus.outbox import Outgoing, enqueue
from services.gen.tandem.tasks.v1 import tasks_pb2
from services.review.service import PriorLabel, State, Task

SCHEMA = "review"


def _task(r: asyncpg.Record) -> Task:
    return Task(
        task_id=str(r["task_id"]),
        item_id=str(r["item_id"]),
        project_id=r["project_id"],
        external_id=r["external_id"],
        text=r["text"],
        suggested_label=r["suggested_label"],
        confidence=r["confidence"],
        reason=r["reason"],
        synthetic=r["synthetic"],
        state=State(r["state"]),
        lease_id=str(r["lease_id"]) if r["lease_id"] else None,
        lease_owner=r["lease_owner"],
        lease_expires_at=r["lease_expires_at"],
        round=r["round"],
        withdraw_requested=r["withdraw_requested"],
    )


def task_id(item_id: str, round_: int) -> str:
    """Derived from the item (and round), so a redelivered request cannot create a second task."""
    key = f"task:{item_id}" if round_ == 0 else f"task:{item_id}:{round_}"
    return str(uuid.uuid5(uuid.NAMESPACE_URL, key))


async def upsert_tasks(conn: asyncpg.Connection, tasks: Sequence[tasks_pb2.ReviewTask]) -> None:
    full = [t for t in tasks if t.text]
    rerank = [t for t in tasks if not t.text]
    if full:
        # A first-round task whose item was withdrawn before it arrived is stored withdrawn, so it
        # never reaches the queue. A later round is a new question (a second opinion on a label
        # people gave anyway) and goes ahead.
        await conn.execute(
            "INSERT INTO review.tasks (task_id, item_id, project_id, external_id, text, suggested_label,"
            " confidence, reason, priority, synthetic, round, state)"
            " SELECT n.*, CASE WHEN n.round = 0 AND EXISTS (SELECT 1 FROM review.withdrawals w"
            "  WHERE w.item_id = n.item_id) THEN 'withdrawn' ELSE 'open' END"
            " FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[],"
            " $7::real[], $8::text[], $9::float8[], $10::boolean[], $11::int[])"
            " AS n(task_id, item_id, project_id, external_id, text, suggested_label, confidence, reason,"
            " priority, synthetic, round)"
            " ON CONFLICT (item_id, round) DO UPDATE SET priority = EXCLUDED.priority, updated_at = now()"
            " WHERE review.tasks.state = 'open'",
            [task_id(t.item_id, t.round) for t in full],
            [t.item_id for t in full],
            [t.project_id for t in full],
            [t.external_id for t in full],
            [t.text for t in full],
            [t.suggested_label for t in full],
            [t.confidence for t in full],
            [t.reason for t in full],
            [t.priority for t in full],
            [t.synthetic for t in full],
            [t.round for t in full],
        )
    if rerank:
        # A re-rank may also change why people see the item (a waiting item drawn for audit).
        await conn.execute(
            "UPDATE review.tasks t SET priority = r.priority,"
            " reason = COALESCE(NULLIF(r.reason, ''), t.reason), updated_at = now()"
            " FROM unnest($1::uuid[], $2::float8[], $3::text[]) AS r(item_id, priority, reason)"
            " WHERE t.item_id = r.item_id AND t.state = 'open'",
            [t.item_id for t in rerank],
            [t.priority for t in rerank],
            [t.reason for t in rerank],
        )


async def withdraw(conn: asyncpg.Connection, project_id: str, item_ids: Sequence[str]) -> int:
    """Record the withdrawal (for tasks still to come), withdraw open tasks, and mark leased ones
    to be withdrawn when their lease ends unanswered (a label given meanwhile still counts).
    Returns how many open tasks were withdrawn; a repeated withdrawal changes nothing."""
    ids = list(item_ids)
    await conn.execute(
        "INSERT INTO review.withdrawals (item_id, project_id) SELECT unnest($1::uuid[]), $2"
        " ON CONFLICT (item_id) DO NOTHING",
        ids,
        project_id,
    )
    await conn.execute(
        "UPDATE review.tasks SET withdraw_requested = true, updated_at = now()"
        " WHERE item_id = ANY($1::uuid[]) AND state = 'leased' AND NOT withdraw_requested",
        ids,
    )
    result = await conn.execute(
        "UPDATE review.tasks SET state = 'withdrawn', updated_at = now()"
        " WHERE item_id = ANY($1::uuid[]) AND state = 'open'",
        ids,
    )
    return int(result.split()[-1])


async def claim_next(
    conn: asyncpg.Connection,
    project_id: str,
    annotator_id: str,
    lease_seconds: float,
    *,
    second_opinions_only: bool = False,
    include_skipped: bool = False,
) -> Task | None:
    row = await conn.fetchrow(
        "WITH next AS ("
        " SELECT t0.task_id FROM review.tasks t0 WHERE t0.project_id = $1 AND t0.state = 'open'"
        " AND t0.round >= $5"
        # A second opinion must come from someone who has not labeled the item in another round
        # (service.labeled_other_round, checked again at submit).
        " AND NOT EXISTS (SELECT 1 FROM review.annotations a"
        "  JOIN review.tasks p ON p.task_id = a.task_id WHERE p.item_id = t0.item_id AND p.round <> t0.round"
        "  AND a.annotator_id = $3)"
        # What a person skipped goes to someone else (unless they ask for it back).
        " AND ($6 OR NOT EXISTS (SELECT 1 FROM review.skips s WHERE s.task_id = t0.task_id"
        "  AND s.annotator_id = $3))"
        " ORDER BY t0.priority DESC, t0.created_at LIMIT 1 FOR UPDATE SKIP LOCKED)"
        " UPDATE review.tasks t SET state = 'leased', lease_id = $2, lease_owner = $3,"
        " lease_expires_at = now() + make_interval(secs => $4), updated_at = now()"
        " FROM next WHERE t.task_id = next.task_id RETURNING t.*",
        project_id,
        uuid.uuid4(),
        annotator_id,
        lease_seconds,
        1 if second_opinions_only else 0,
        include_skipped,
    )
    return _task(row) if row is not None else None


async def record_skip(conn: asyncpg.Connection, task_id: str, annotator_id: str, reason: str) -> None:
    await conn.execute(
        "INSERT INTO review.skips (task_id, annotator_id, reason) VALUES ($1, $2, $3)"
        " ON CONFLICT (task_id, annotator_id) DO UPDATE SET skipped_at = now(), reason = EXCLUDED.reason",
        uuid.UUID(task_id),
        annotator_id,
        reason[:200],
    )


async def lock_task(conn: asyncpg.Connection, task_id: str) -> tuple[Task, datetime] | None:
    """The task, locked for the transaction, and the database's time (the clock leases run on)."""
    row = await conn.fetchrow(
        "SELECT *, now() AS checked_at FROM review.tasks WHERE task_id = $1 FOR UPDATE", uuid.UUID(task_id)
    )
    return (_task(row), row["checked_at"]) if row is not None else None


async def item_labels(conn: asyncpg.Connection, item_id: str) -> list[PriorLabel]:
    """Every label people gave to the item's tasks, all rounds, read under a lock on the item held
    to the end of the transaction: each round's task is locked on its own, so without it a first
    label and its second opinion by the same person, submitted at once, would not see each other."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _item_lock_key(item_id))
    rows = await conn.fetch(
        "SELECT t.round, a.annotator_id FROM review.annotations a JOIN review.tasks t USING (task_id)"
        " WHERE t.item_id = $1",
        uuid.UUID(item_id),
    )
    return [PriorLabel(r["round"], r["annotator_id"]) for r in rows]


def _item_lock_key(item_id: str) -> int:
    return int.from_bytes(uuid.UUID(item_id).bytes[:8], "big", signed=True)


async def complete(
    conn: asyncpg.Connection, task_id: str, annotator_id: str, label: str, seconds: float
) -> datetime:
    await conn.execute(
        "UPDATE review.tasks SET state = 'done', lease_id = NULL, lease_expires_at = NULL, updated_at = now()"
        " WHERE task_id = $1",
        uuid.UUID(task_id),
    )
    created: datetime = await conn.fetchval(
        "INSERT INTO review.annotations (task_id, annotator_id, label, seconds_spent) VALUES ($1, $2, $3, $4)"
        " RETURNING created_at",
        uuid.UUID(task_id),
        annotator_id,
        label,
        seconds,
    )
    return created


async def release(conn: asyncpg.Connection, task_id: str, state: State, *, skipped: bool) -> None:
    """End a lease without a label; `state` is service.state_after_lease."""
    await conn.execute(
        "UPDATE review.tasks SET state = $2, lease_id = NULL, lease_owner = NULL, lease_expires_at = NULL,"
        " skips = skips + $3, updated_at = now() WHERE task_id = $1 AND state = 'leased'",
        uuid.UUID(task_id),
        str(state),
        1 if skipped else 0,
    )


async def extend(conn: asyncpg.Connection, task_id: str, seconds: float) -> Task | None:
    row = await conn.fetchrow(
        "UPDATE review.tasks SET lease_expires_at = now() + make_interval(secs => $2), updated_at = now()"
        " WHERE task_id = $1 AND state = 'leased' RETURNING *",
        uuid.UUID(task_id),
        seconds,
    )
    return _task(row) if row is not None else None


async def expire_leases(conn: asyncpg.Connection) -> dict[State, int]:
    """End every lease past its time; how many tasks went to each state. The CASE is
    service.state_after_lease, in bulk."""
    rows = await conn.fetch(
        "WITH ended AS (UPDATE review.tasks SET"
        " state = CASE WHEN withdraw_requested THEN 'withdrawn' ELSE 'open' END,"
        " lease_id = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = now()"
        " WHERE state = 'leased' AND lease_expires_at < now() RETURNING state)"
        " SELECT state, count(*) AS n FROM ended GROUP BY state"
    )
    return {State(r["state"]): r["n"] for r in rows}


async def publish(conn: asyncpg.Connection, outgoing: Sequence[Outgoing]) -> None:
    await enqueue(conn, SCHEMA, outgoing)


async def counts(conn: asyncpg.Connection, project_id: str) -> dict[str, float]:
    row = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE state = 'open') AS open,"
        " count(*) FILTER (WHERE state = 'leased') AS leased,"
        " count(*) FILTER (WHERE state = 'done') AS done,"
        " count(*) FILTER (WHERE state = 'withdrawn') AS withdrawn"
        " FROM review.tasks WHERE project_id = $1",
        project_id,
    )
    ann = await conn.fetchrow(
        "SELECT count(DISTINCT a.annotator_id) AS annotators, coalesce(avg(a.seconds_spent), 0) AS mean_seconds"
        " FROM review.annotations a JOIN review.tasks t USING (task_id) WHERE t.project_id = $1",
        project_id,
    )
    assert row is not None and ann is not None
    return {**dict(row), **dict(ann)}


async def queue_depth(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT state, count(*) AS n FROM review.tasks WHERE state IN ('open', 'leased') GROUP BY state"
    )
    return {r["state"]: r["n"] for r in rows}
