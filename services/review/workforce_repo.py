"""SQL of the workforce (schema `review`): pools, people, gold questions, quality figures."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from services.review.repo import standing_of
from services.review.service import Standing, State, Task


@dataclass(frozen=True)
class Pool:
    pool_id: str
    name: str
    max_leased: int
    vendor_user_id: str


@dataclass(frozen=True)
class Member:
    annotator_id: str
    pool_id: str
    skills: tuple[str, ...]
    max_leased: int
    paused_projects: tuple[str, ...] = ()


@dataclass(frozen=True)
class Gold:
    external_id: str
    text: str
    answer: str


def _pool(r: asyncpg.Record) -> Pool:
    return Pool(r["pool_id"], r["name"], r["max_leased"], r["vendor_user_id"])


async def put_pool(conn: asyncpg.Connection, pool: Pool) -> Pool:
    r = await conn.fetchrow(
        "INSERT INTO review.pools (pool_id, name, max_leased, vendor_user_id) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (pool_id) DO UPDATE SET name = EXCLUDED.name, max_leased = EXCLUDED.max_leased,"
        " vendor_user_id = EXCLUDED.vendor_user_id, updated_at = now() RETURNING *",
        pool.pool_id,
        pool.name,
        pool.max_leased,
        pool.vendor_user_id,
    )
    assert r is not None
    return _pool(r)


async def pools(conn: asyncpg.Connection) -> list[Pool]:
    return [_pool(r) for r in await conn.fetch("SELECT * FROM review.pools ORDER BY pool_id")]


async def pool_exists(conn: asyncpg.Connection, pool_id: str) -> bool:
    return bool(await conn.fetchval("SELECT 1 FROM review.pools WHERE pool_id = $1", pool_id))


async def vendor_pool(conn: asyncpg.Connection, user_id: str) -> str | None:
    """The pool a vendor account works for."""
    pool_id: str | None = await conn.fetchval(
        "SELECT pool_id FROM review.pools WHERE vendor_user_id = $1", user_id
    )
    return pool_id


async def put_member(conn: asyncpg.Connection, member: Member) -> Member:
    await conn.execute(
        "INSERT INTO review.annotators (annotator_id, pool_id, skills, max_leased) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (annotator_id) DO UPDATE SET pool_id = EXCLUDED.pool_id, skills = EXCLUDED.skills,"
        " max_leased = EXCLUDED.max_leased",
        member.annotator_id,
        member.pool_id,
        list(member.skills),
        member.max_leased,
    )
    found = await members(conn, annotator_id=member.annotator_id)
    return found[0]


async def ensure_member(conn: asyncpg.Connection, annotator_id: str, pool_id: str) -> None:
    """A vendor's worker joins the vendor's pool the first time the vendor claims for them."""
    await conn.execute(
        "INSERT INTO review.annotators (annotator_id, pool_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        annotator_id,
        pool_id,
    )


async def members(conn: asyncpg.Connection, *, pool_id: str = "", annotator_id: str = "") -> list[Member]:
    rows = await conn.fetch(
        "SELECT a.*, COALESCE((SELECT array_agg(s.project_id ORDER BY s.project_id) FROM review.standing s"
        "  WHERE s.annotator_id = a.annotator_id AND s.paused), '{}') AS paused_projects"
        " FROM review.annotators a WHERE ($1 = '' OR a.pool_id = $1) AND ($2 = '' OR a.annotator_id = $2)"
        " ORDER BY a.annotator_id",
        pool_id,
        annotator_id,
    )
    return [
        Member(
            r["annotator_id"], r["pool_id"], tuple(r["skills"]), r["max_leased"], tuple(r["paused_projects"])
        )
        for r in rows
    ]


async def set_paused(
    conn: asyncpg.Connection, project_id: str, annotator_id: str, paused: bool, reason: str
) -> None:
    await conn.execute(
        "INSERT INTO review.standing (project_id, annotator_id, paused, paused_reason, paused_at)"
        " VALUES ($1, $2, $3, $4, CASE WHEN $3 THEN now() END)"
        " ON CONFLICT (project_id, annotator_id) DO UPDATE SET paused = EXCLUDED.paused,"
        " paused_reason = EXCLUDED.paused_reason, paused_at = EXCLUDED.paused_at",
        project_id,
        annotator_id,
        paused,
        reason[:200],
    )


# -- gold --------------------------------------------------------------------------------------


def gold_id(project_id: str, external_id: str) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"gold:{project_id}:{external_id}")


async def add_gold(conn: asyncpg.Connection, project_id: str, items: Sequence[Gold]) -> tuple[int, int]:
    """Store gold items (an external id already there is replaced); (stored, total)."""
    await conn.execute(
        "INSERT INTO review.gold (gold_id, project_id, external_id, text, answer)"
        " SELECT g.gold_id, $1, g.external_id, g.text, g.answer"
        " FROM unnest($2::uuid[], $3::text[], $4::text[], $5::text[]) AS g(gold_id, external_id, text, answer)"
        " ON CONFLICT (gold_id) DO UPDATE SET text = EXCLUDED.text, answer = EXCLUDED.answer",
        project_id,
        [gold_id(project_id, g.external_id) for g in items],
        [g.external_id for g in items],
        [g.text for g in items],
        [g.answer for g in items],
    )
    total = await conn.fetchval("SELECT count(*) FROM review.gold WHERE project_id = $1", project_id)
    return len(items), int(total)


async def gold_count(conn: asyncpg.Connection, project_id: str) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM review.gold WHERE project_id = $1", project_id))


def _gold_task(r: asyncpg.Record) -> Task:
    # A gold question looks like an audit to the person (no suggestion, a task id like any other).
    return Task(
        task_id=str(r["task_id"]),
        item_id=str(r["gold_id"]),
        project_id=r["project_id"],
        external_id=r["external_id"],
        text=r["text"],
        suggested_label="",
        confidence=0.0,
        reason="audit",
        synthetic=False,
        state=State(r["state"]),
        lease_id=str(r["lease_id"]) if r["lease_id"] else None,
        lease_owner=r["annotator_id"],
        lease_expires_at=r["lease_expires_at"],
        round=0,
        pool_id=r["pool_id"],
        gold=True,
    )


async def claim_gold(
    conn: asyncpg.Connection, project_id: str, annotator_id: str, pool_id: str, lease_seconds: float
) -> Task | None:
    """Lease a gold question the person has not had; None when they have had them all."""
    row = await conn.fetchrow(
        "WITH g AS (SELECT gold_id FROM review.gold g WHERE g.project_id = $1 AND NOT EXISTS"
        "  (SELECT 1 FROM review.gold_tasks t WHERE t.gold_id = g.gold_id AND t.annotator_id = $2)"
        "  ORDER BY random() LIMIT 1),"
        " ins AS (INSERT INTO review.gold_tasks (task_id, gold_id, project_id, annotator_id, pool_id, lease_id,"
        "  lease_expires_at) SELECT gen_random_uuid(), g.gold_id, $1, $2, $3, gen_random_uuid(),"
        "  now() + make_interval(secs => $4) FROM g RETURNING *)"
        " SELECT ins.*, gold.external_id, gold.text FROM ins JOIN review.gold gold USING (gold_id)",
        project_id,
        annotator_id,
        pool_id,
        lease_seconds,
    )
    return _gold_task(row) if row is not None else None


async def lock_gold_task(conn: asyncpg.Connection, task_id: str) -> tuple[Task, datetime, str, str] | None:
    """A gold task, locked: (task, database time, the right answer, the label given)."""
    row = await conn.fetchrow(
        "SELECT t.*, g.external_id, g.text, g.answer, now() AS checked_at FROM review.gold_tasks t"
        " JOIN review.gold g USING (gold_id) WHERE t.task_id = $1 FOR UPDATE OF t",
        uuid.UUID(task_id),
    )
    if row is None:
        return None
    return _gold_task(row), row["checked_at"], row["answer"], row["label"]


async def answer_gold(
    conn: asyncpg.Connection, task: Task, label: str, correct: bool, seconds: float
) -> Standing:
    """Record a gold answer and count it in the person's standing, which is returned."""
    await conn.execute(
        "UPDATE review.gold_tasks SET state = 'done', label = $2, correct = $3, seconds_spent = $4,"
        " lease_id = NULL, lease_expires_at = NULL WHERE task_id = $1",
        uuid.UUID(task.task_id),
        label,
        correct,
        seconds,
    )
    r = await conn.fetchrow(
        "UPDATE review.standing SET gold_answered = gold_answered + 1, gold_correct = gold_correct + $3"
        " WHERE project_id = $1 AND annotator_id = $2 RETURNING *",
        task.project_id,
        task.lease_owner,
        1 if correct else 0,
    )
    assert r is not None
    return standing_of(r)


async def drop_gold_task(conn: asyncpg.Connection, task_id: str) -> None:
    """A gold question given back or expired unanswered: it may be asked again later."""
    await conn.execute(
        "DELETE FROM review.gold_tasks WHERE task_id = $1 AND state = 'leased'", uuid.UUID(task_id)
    )


async def extend_gold(conn: asyncpg.Connection, task_id: str, seconds: float) -> None:
    await conn.execute(
        "UPDATE review.gold_tasks SET lease_expires_at = now() + make_interval(secs => $2)"
        " WHERE task_id = $1 AND state = 'leased'",
        uuid.UUID(task_id),
        seconds,
    )


async def expire_gold(conn: asyncpg.Connection) -> int:
    result = await conn.execute(
        "DELETE FROM review.gold_tasks WHERE state = 'leased' AND lease_expires_at < now()"
    )
    return int(result.split()[-1])


# -- quality -----------------------------------------------------------------------------------


async def judgments(conn: asyncpg.Connection, project_id: str) -> list[tuple[str, str, str]]:
    """(item, annotator, label) of every first-round label on items several people labeled."""
    rows = await conn.fetch(
        "SELECT t.item_id, a.annotator_id, a.label FROM review.annotations a JOIN review.tasks t USING (task_id)"
        " WHERE t.project_id = $1 AND t.round = 0 AND EXISTS (SELECT 1 FROM review.tasks o"
        "  WHERE o.item_id = t.item_id AND o.round = 0 AND o.slot > 0)",
        project_id,
    )
    return [(str(r["item_id"]), r["annotator_id"], r["label"]) for r in rows]


async def consensus(conn: asyncpg.Connection, project_id: str) -> dict[str, tuple[str, float, str]]:
    rows = await conn.fetch(
        "SELECT item_id, label, posterior, method FROM review.consensus WHERE project_id = $1", project_id
    )
    return {str(r["item_id"]): (r["label"], r["posterior"], r["method"]) for r in rows}


@dataclass(frozen=True)
class PersonFigures:
    annotator_id: str
    pool_id: str
    labels: int
    gold_answered: int
    gold_correct: int
    paused: bool
    paused_reason: str
    leased: int


async def people(
    conn: asyncpg.Connection, project_id: str, pool_ids: Sequence[str] = ()
) -> list[PersonFigures]:
    """Everyone who worked on the project, and the members of its pools who have not started yet."""
    rows = await conn.fetch(
        "WITH labels AS (SELECT a.annotator_id, count(*) AS n FROM review.annotations a"
        "  JOIN review.tasks t USING (task_id) WHERE t.project_id = $1 GROUP BY 1),"
        " leased AS (SELECT lease_owner AS annotator_id, count(*) AS n FROM review.tasks"
        "  WHERE project_id = $1 AND state = 'leased' GROUP BY 1),"
        " who AS (SELECT annotator_id FROM review.standing WHERE project_id = $1"
        "  UNION SELECT annotator_id FROM review.annotators WHERE pool_id = ANY($2::text[]))"
        " SELECT w.annotator_id, COALESCE(p.pool_id, '') AS pool_id, COALESCE(l.n, 0) AS labels,"
        " COALESCE(s.gold_answered, 0) AS gold_answered, COALESCE(s.gold_correct, 0) AS gold_correct,"
        " COALESCE(s.paused, false) AS paused, COALESCE(s.paused_reason, '') AS paused_reason,"
        " COALESCE(le.n, 0) AS leased"
        " FROM who w LEFT JOIN review.standing s ON s.project_id = $1 AND s.annotator_id = w.annotator_id"
        " LEFT JOIN review.annotators p ON p.annotator_id = w.annotator_id"
        " LEFT JOIN labels l ON l.annotator_id = w.annotator_id"
        " LEFT JOIN leased le ON le.annotator_id = w.annotator_id ORDER BY w.annotator_id",
        project_id,
        list(pool_ids),
    )
    return [
        PersonFigures(
            r["annotator_id"],
            r["pool_id"],
            int(r["labels"]),
            r["gold_answered"],
            r["gold_correct"],
            r["paused"],
            r["paused_reason"],
            int(r["leased"]),
        )
        for r in rows
    ]


@dataclass(frozen=True)
class PoolQueue:
    pool_id: str
    open: int
    leased: int
    oldest_open_seconds: float


async def pool_queues(conn: asyncpg.Connection, project_id: str) -> list[PoolQueue]:
    rows = await conn.fetch(
        "SELECT pool_id, count(*) FILTER (WHERE state = 'open') AS open,"
        " count(*) FILTER (WHERE state = 'leased') AS leased,"
        " COALESCE(extract(epoch FROM now() - min(created_at) FILTER (WHERE state = 'open')), 0) AS oldest"
        " FROM review.tasks WHERE project_id = $1 AND state IN ('open', 'leased') GROUP BY pool_id",
        project_id,
    )
    return [PoolQueue(r["pool_id"], int(r["open"]), int(r["leased"]), float(r["oldest"])) for r in rows]


async def queue_depth_by_pool(conn: asyncpg.Connection) -> list[tuple[str, str, int, float]]:
    """(pool, state, tasks, age of the oldest open one) across projects, for the gauges."""
    rows = await conn.fetch(
        "SELECT pool_id, state, count(*) AS n,"
        " COALESCE(extract(epoch FROM now() - min(created_at)), 0) AS oldest"
        " FROM review.tasks WHERE state IN ('open', 'leased') GROUP BY pool_id, state"
    )
    return [(r["pool_id"], r["state"], int(r["n"]), float(r["oldest"])) for r in rows]
