"""SQL of the review service (schema `review`)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from services.common.bus.outbox import Outgoing, enqueue
from services.review.service import Person, PriorLabel, SlotState, Standing, State, Task

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
        slot=r["slot"],
        pool_id=r["pool_id"],
    )


def task_id(item_id: str, round_: int, slot: int = 0) -> str:
    """Derived from the item (round and slot), so a redelivered request cannot create a second task."""
    key = f"task:{item_id}" if round_ == 0 else f"task:{item_id}:{round_}"
    if slot:
        key += f":slot{slot}"
    return str(uuid.uuid5(uuid.NAMESPACE_URL, key))


@dataclass(frozen=True)
class NewTask:
    """A task the scorer asked for, routed: one per overlap slot, each with its pool."""

    task_id: str
    item_id: str
    project_id: str
    external_id: str
    text: str
    suggested_label: str
    confidence: float
    reason: str
    priority: float
    synthetic: bool
    round: int
    slot: int
    pool_id: str


@dataclass(frozen=True)
class Rerank:
    item_id: str
    priority: float
    reason: str


async def upsert_tasks(conn: asyncpg.Connection, full: Sequence[NewTask], rerank: Sequence[Rerank]) -> None:
    if full:
        # A first-round task whose item was withdrawn before it arrived is stored withdrawn, so it
        # never reaches the queue. A later round is a new question (a second opinion on a label
        # people gave anyway) and goes ahead.
        await conn.execute(
            "INSERT INTO review.tasks (task_id, item_id, project_id, external_id, text, suggested_label,"
            " confidence, reason, priority, synthetic, round, slot, pool_id, state, skills)"
            " SELECT n.*, CASE WHEN n.round = 0 AND EXISTS (SELECT 1 FROM review.withdrawals w"
            "  WHERE w.item_id = n.item_id) THEN 'withdrawn' ELSE 'open' END,"
            " COALESCE((SELECT s.skills FROM review.item_skills s WHERE s.item_id = n.item_id), '{}')"
            " FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[],"
            " $7::real[], $8::text[], $9::float8[], $10::boolean[], $11::int[], $12::int[], $13::text[])"
            " AS n(task_id, item_id, project_id, external_id, text, suggested_label, confidence, reason,"
            " priority, synthetic, round, slot, pool_id)"
            " ON CONFLICT (item_id, round, slot) DO UPDATE SET priority = EXCLUDED.priority, updated_at = now()"
            " WHERE review.tasks.state = 'open'",
            [t.task_id for t in full],
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
            [t.slot for t in full],
            [t.pool_id for t in full],
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


async def lock_person(conn: asyncpg.Connection, annotator_id: str) -> tuple[str, tuple[str, ...], int]:
    """The person asking, locked to the end of the transaction (their claims queue behind each
    other, so no two can both see room under their cap): (pool, skills, own cap)."""
    r = await conn.fetchrow(
        "INSERT INTO review.annotators (annotator_id) VALUES ($1)"
        " ON CONFLICT (annotator_id) DO UPDATE SET annotator_id = EXCLUDED.annotator_id"
        " RETURNING pool_id, skills, max_leased",
        annotator_id,
    )
    assert r is not None
    return r["pool_id"], tuple(r["skills"]), r["max_leased"]


async def standing(conn: asyncpg.Connection, project_id: str, annotator_id: str) -> tuple[Standing, int]:
    """The person's standing on the project, and the tasks they hold now (any project). Run after
    lock_person: a statement of its own, its snapshot is taken once that lock was granted, so it
    counts the leases of the claim that held the lock before."""
    r = await conn.fetchrow(
        "INSERT INTO review.standing (project_id, annotator_id) VALUES ($1, $2)"
        " ON CONFLICT (project_id, annotator_id) DO UPDATE SET served = review.standing.served"
        " RETURNING *,"
        " (SELECT count(*) FROM review.tasks t WHERE t.state = 'leased' AND t.lease_owner = $2)"
        " + (SELECT count(*) FROM review.gold_tasks g WHERE g.state = 'leased' AND g.annotator_id = $2)"
        " AS holding",
        project_id,
        annotator_id,
    )
    assert r is not None
    return standing_of(r), int(r["holding"])


def standing_of(r: asyncpg.Record) -> Standing:
    return Standing(
        served=r["served"],
        gold_served=r["gold_served"],
        gold_answered=r["gold_answered"],
        gold_correct=r["gold_correct"],
        paused=r["paused"],
        paused_reason=r["paused_reason"],
    )


async def served(conn: asyncpg.Connection, project_id: str, annotator_id: str, *, gold: bool) -> None:
    await conn.execute(
        "UPDATE review.standing SET served = served + 1, gold_served = gold_served + $3"
        " WHERE project_id = $1 AND annotator_id = $2",
        project_id,
        annotator_id,
        1 if gold else 0,
    )


async def pool_load(conn: asyncpg.Connection, pool_id: str) -> tuple[int, int] | None:
    """(cap, leased) of a pool with a cap, its row locked so concurrent claims count one by one;
    None when the pool has no cap."""
    cap = await conn.fetchval(
        "SELECT max_leased FROM review.pools WHERE pool_id = $1 AND max_leased > 0 FOR UPDATE", pool_id
    )
    if cap is None:
        return None
    leased = await conn.fetchval(
        "SELECT (SELECT count(*) FROM review.tasks WHERE state = 'leased' AND lease_pool = $1)"
        " + (SELECT count(*) FROM review.gold_tasks WHERE state = 'leased' AND pool_id = $1)",
        pool_id,
    )
    return int(cap), int(leased)


# What a person may take: not an item they labeled or hold another task of (one label per item,
# rounds and overlap slots alike: service.labeled_other_task, checked again at submit), not what
# they skipped (unless they ask for it back), only with the skills it needs. Two plain NOT EXISTS,
# not one with an OR: the planner estimates those right and keeps walking the queue index in
# priority order; with the OR it took the test for nearly always false and, at 1M open tasks,
# switched to a plan that read and sorted every open task (5 s a claim instead of 2 ms).
def _eligible(person: str, min_round: str, include_skipped: str, skills: str) -> str:
    """The filter on open tasks `t0` a person may take, on the given query parameters."""
    return (
        f" AND t0.round >= {min_round}"
        f" AND t0.skills <@ {skills}::text[]"
        " AND NOT EXISTS (SELECT 1 FROM review.tasks p JOIN review.annotations a ON a.task_id = p.task_id"
        f"  WHERE p.item_id = t0.item_id AND a.annotator_id = {person})"
        " AND NOT EXISTS (SELECT 1 FROM review.tasks p WHERE p.item_id = t0.item_id AND p.state = 'leased'"
        f"  AND p.lease_owner = {person})"
        f" AND ({include_skipped} OR NOT EXISTS (SELECT 1 FROM review.skips s WHERE s.task_id = t0.task_id"
        f"  AND s.annotator_id = {person}))"
    )


_ELIGIBLE = _eligible("$3", "$5", "$6", "$8")
# The lease, and the person's count of tasks served on the project (the gold schedule), in the
# same statement: one round trip less on every claim.
_LEASE = (
    ", leased AS (UPDATE review.tasks t SET state = 'leased', lease_id = $2, lease_owner = $3,"
    " lease_pool = $7, lease_expires_at = now() + make_interval(secs => $4), updated_at = now()"
    " FROM next WHERE t.task_id = next.task_id RETURNING t.*),"
    " counted AS (UPDATE review.standing SET served = served + 1 WHERE project_id = $1"
    " AND annotator_id = $3 AND EXISTS (SELECT 1 FROM leased))"
    " SELECT * FROM leased"
)


async def claim_next(
    conn: asyncpg.Connection,
    project_id: str,
    person: Person,
    queue: str,
    lease_seconds: float,
    *,
    sla_seconds: float = 0.0,
    second_opinions_only: bool = False,
    include_skipped: bool = False,
) -> Task | None:
    """Lease the next task: one waiting past the project's SLA first (oldest first, whatever its
    pool), else the head of the person's pool queue by priority."""
    min_round = 1 if second_opinions_only else 0
    args = (
        project_id,
        uuid.uuid4(),
        person.annotator_id,
        lease_seconds,
        min_round,
        include_skipped,
        person.pool_id,
        list(person.skills),
    )
    if sla_seconds > 0:
        row = await conn.fetchrow(
            "WITH next AS (SELECT t0.task_id FROM review.tasks t0 WHERE t0.project_id = $1"
            " AND t0.state = 'open' AND t0.created_at < now() - make_interval(secs => $9)"
            + _ELIGIBLE
            + " ORDER BY t0.created_at LIMIT 1 FOR UPDATE SKIP LOCKED)"
            + _LEASE,
            *args,
            sla_seconds,
        )
        if row is not None:
            return _task(row)
    head = " FROM review.tasks t0 WHERE t0.project_id = $1 AND t0.state = 'open' AND t0.pool_id = "
    order = " ORDER BY t0.priority DESC, t0.created_at LIMIT 1 FOR UPDATE"
    lease = "WITH next AS (SELECT t0.task_id" + head + "$9" + _ELIGIBLE + order + " SKIP LOCKED)" + _LEASE
    row = await conn.fetchrow(lease, *args, queue)
    locked = "SELECT t0.task_id" + head + "$2" + _eligible("$3", "$4", "$5", "$6") + order
    person_args = (person.annotator_id, min_round, include_skipped, list(person.skills))
    if row is None and await conn.fetchval(locked, project_id, queue, *person_args):
        # Skipping locked rows keeps concurrent claims off each other's head task, but a re-rank
        # locks every open task it moves until it commits: the queue would look empty to a person
        # while tasks wait. Waited for (the row it locks is this transaction's, so not skipped),
        # the queue is read again in the order the re-rank set.
        row = await conn.fetchrow(lease, *args, queue)
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
        "SELECT t.round, t.slot, a.annotator_id FROM review.annotations a JOIN review.tasks t USING (task_id)"
        " WHERE t.item_id = $1",
        uuid.UUID(item_id),
    )
    return [PriorLabel(r["round"], r["annotator_id"], r["slot"]) for r in rows]


async def item_slots(conn: asyncpg.Connection, item_id: str) -> list[SlotState]:
    """The item's first-round tasks and their labels (call after item_labels, under its lock)."""
    rows = await conn.fetch(
        "SELECT t.slot, t.state, a.annotator_id, a.label FROM review.tasks t"
        " LEFT JOIN review.annotations a USING (task_id) WHERE t.item_id = $1 AND t.round = 0 ORDER BY t.slot",
        uuid.UUID(item_id),
    )
    return [SlotState(r["slot"], State(r["state"]), r["annotator_id"], r["label"]) for r in rows]


async def add_slot(conn: asyncpg.Connection, template: Task, slot: int, pool_id: str) -> None:
    """One more person for the item: a copy of its task in a new slot, keeping the item's age (an
    SLA counts from when the item first waited) and priority."""
    await conn.execute(
        "INSERT INTO review.tasks (task_id, item_id, project_id, external_id, text, suggested_label,"
        " confidence, reason, priority, synthetic, round, slot, pool_id, skills, created_at)"
        " SELECT $2, item_id, project_id, external_id, text, suggested_label, confidence, reason, priority,"
        " synthetic, round, $3, $4, skills, created_at FROM review.tasks WHERE task_id = $1"
        " ON CONFLICT (item_id, round, slot) DO NOTHING",
        uuid.UUID(template.task_id),
        uuid.UUID(task_id(template.item_id, template.round, slot)),
        slot,
        pool_id,
    )


async def record_consensus(
    conn: asyncpg.Connection,
    item_id: str,
    project_id: str,
    label: str,
    posterior: float,
    method: str,
    annotators: Sequence[str],
) -> None:
    await conn.execute(
        "INSERT INTO review.consensus (item_id, project_id, label, posterior, method, annotators)"
        " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (item_id) DO UPDATE SET label = EXCLUDED.label,"
        " posterior = EXCLUDED.posterior, method = EXCLUDED.method, annotators = EXCLUDED.annotators,"
        " updated_at = now()",
        uuid.UUID(item_id),
        project_id,
        label,
        posterior,
        method,
        list(annotators),
    )


async def paused(conn: asyncpg.Connection, project_id: str) -> set[str]:
    rows = await conn.fetch(
        "SELECT annotator_id FROM review.standing WHERE project_id = $1 AND paused", project_id
    )
    return {r["annotator_id"] for r in rows}


def _item_lock_key(item_id: str) -> int:
    return int.from_bytes(uuid.UUID(item_id).bytes[:8], "big", signed=True)


async def complete(
    conn: asyncpg.Connection, task_id: str, annotator_id: str, label: str, seconds: float, pool_id: str = ""
) -> datetime:
    await conn.execute(
        "UPDATE review.tasks SET state = 'done', lease_id = NULL, lease_expires_at = NULL, lease_pool = NULL,"
        " updated_at = now()"
        " WHERE task_id = $1",
        uuid.UUID(task_id),
    )
    created: datetime = await conn.fetchval(
        "INSERT INTO review.annotations (task_id, annotator_id, label, seconds_spent, pool_id)"
        " VALUES ($1, $2, $3, $4, $5) RETURNING created_at",
        uuid.UUID(task_id),
        annotator_id,
        label,
        seconds,
        pool_id,
    )
    return created


async def release(conn: asyncpg.Connection, task_id: str, state: State, *, skipped: bool) -> None:
    """End a lease without a label; `state` is service.state_after_lease."""
    await conn.execute(
        "UPDATE review.tasks SET state = $2, lease_id = NULL, lease_owner = NULL, lease_expires_at = NULL,"
        " lease_pool = NULL, skips = skips + $3, updated_at = now() WHERE task_id = $1 AND state = 'leased'",
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
        " lease_id = NULL, lease_owner = NULL, lease_expires_at = NULL, lease_pool = NULL, updated_at = now()"
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


async def lock_skills(conn: asyncpg.Connection, project_id: str) -> None:
    """Serializes a project's task inserts with its skill records: each reads what the other wrote,
    and without the lock two concurrent transactions would each miss the other's rows."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('review.skills:' || $1))", project_id)


async def record_item_skills(
    conn: asyncpg.Connection, project_id: str, needs: Sequence[tuple[str, list[str]]]
) -> None:
    """Store what each item needs and apply it to its tasks already there (either may come first)."""
    ids = [uuid.UUID(item_id) for item_id, _ in needs]
    # Arrays of arrays cannot be ragged in PostgreSQL: pass each item's skills joined, split in SQL.
    joined = ["\x1f".join(skills) for _, skills in needs]
    await conn.execute(
        "INSERT INTO review.item_skills (item_id, project_id, skills)"
        " SELECT n.item_id, $1, string_to_array(n.skills, chr(31)) FROM unnest($2::uuid[], $3::text[])"
        " AS n(item_id, skills) ON CONFLICT (item_id) DO UPDATE SET skills = EXCLUDED.skills",
        project_id,
        ids,
        joined,
    )
    await conn.execute(
        "UPDATE review.tasks t SET skills = s.skills FROM review.item_skills s"
        " WHERE s.item_id = ANY($1::uuid[]) AND t.item_id = s.item_id",
        ids,
    )
