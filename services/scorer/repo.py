"""SQL of the scorer (schema `scorer`)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg
import numpy as np

from services.common.bus.outbox import Outgoing, enqueue
from services.common.slices import AUDITED_MORE

SCHEMA = "scorer"
# Reasons of items in review that people label whatever a refit finds: no refit decides them.
PEOPLE_ONLY = ("audit", "synthetic", "control")


@dataclass(frozen=True)
class NewItem:
    item_id: str
    external_id: str
    text: str
    synthetic: bool
    embedding: np.ndarray
    zero_shot: list[float]
    model_id: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ItemDecision:
    item_id: str
    state: str
    reason: str
    label: int
    confidence: float
    priority: float


@dataclass(frozen=True)
class Waiting:
    item_id: str
    embedding: np.ndarray
    zero_shot: np.ndarray
    priority: float
    in_flagged_slice: bool = False  # a quality report flagged a slice the item is in


def _vec(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.float32)


def _probs(values: Sequence[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


async def load_label_space(conn: asyncpg.Connection, project_id: str) -> np.ndarray | None:
    row = await conn.fetchrow(
        "SELECT label_embeddings, n_labels, dim FROM scorer.projects WHERE project_id = $1", project_id
    )
    if row is None:
        return None
    return _vec(row["label_embeddings"]).reshape(row["n_labels"], row["dim"])


async def save_label_space(conn: asyncpg.Connection, project_id: str, model_id: str, emb: np.ndarray) -> None:
    await conn.execute(
        "INSERT INTO scorer.projects (project_id, model_id, label_embeddings, n_labels, dim)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (project_id) DO NOTHING",
        project_id,
        model_id,
        np.ascontiguousarray(emb, dtype=np.float32).tobytes(),
        emb.shape[0],
        emb.shape[1],
    )


async def save_model_state(
    conn: asyncpg.Connection, project_id: str, refits: int, certified: float, estimated: float
) -> None:
    await conn.execute(
        "UPDATE scorer.projects SET refits = $2, certified_accuracy = $3, estimated_accuracy = $4,"
        " updated_at = now() WHERE project_id = $1",
        project_id,
        refits,
        certified,
        estimated,
    )


@dataclass(frozen=True)
class StoredCheck:
    """What a label's check (policy.human_checks) is replayed from after a restart."""

    first: int  # the first person's label
    checked_label: int | None  # the model's label it was checked against
    second: int | None  # a second person's label
    final: int  # the label now


@dataclass(frozen=True)
class HumanLabels:
    embeddings: np.ndarray
    zero_shot: np.ndarray
    y: np.ndarray
    item_ids: list[str]
    second_opinion_asked: set[str]
    weights: np.ndarray | None = None  # the aggregate's posterior per label (None = all 1)
    checks: list[StoredCheck] = field(default_factory=list)  # one per label, in the same order


async def load_human_labels(conn: asyncpg.Connection, project_id: str) -> HumanLabels:
    rows = await conn.fetch(
        "SELECT item_id, embedding, zero_shot, human_label, human_weight, second_opinion_requested,"
        " checked_label, first_label, second_label FROM scorer.items"
        " WHERE project_id = $1 AND human_label IS NOT NULL ORDER BY labeled_at, item_id",
        project_id,
    )
    if not rows:
        empty = np.zeros((0, 0), dtype=np.float32)
        return HumanLabels(empty, empty, np.zeros(0, dtype=np.int64), [], set())
    return HumanLabels(
        embeddings=np.vstack([_vec(r["embedding"]) for r in rows]),
        zero_shot=np.vstack([_probs(r["zero_shot"]) for r in rows]),
        y=np.array([r["human_label"] for r in rows], dtype=np.int64),
        item_ids=[str(r["item_id"]) for r in rows],
        second_opinion_asked={str(r["item_id"]) for r in rows if r["second_opinion_requested"]},
        weights=np.array([r["human_weight"] for r in rows], dtype=np.float64),
        checks=[
            StoredCheck(
                r["human_label"] if r["second_label"] is None else r["first_label"],
                r["checked_label"],
                r["second_label"],
                r["human_label"],
            )
            for r in rows
        ],
    )


async def record_checked_labels(conn: asyncpg.Connection, checked: Sequence[tuple[str, int]]) -> None:
    """The model's label each checked human label was compared with: (item id, label)."""
    if checked:
        await conn.execute(
            "UPDATE scorer.items i SET checked_label = c.label FROM unnest($1::uuid[], $2::int[])"
            " AS c(item_id, label) WHERE i.item_id = c.item_id AND i.checked_label IS NULL",
            [c[0] for c in checked],
            [c[1] for c in checked],
        )


@dataclass(frozen=True)
class SecondOpinionItem:
    item_id: str
    external_id: str
    text: str
    synthetic: bool


async def request_second_opinions(
    conn: asyncpg.Connection, suspected: Sequence[tuple[str, int]]
) -> list[SecondOpinionItem]:
    """Mark items for a second opinion (once each); returns those newly marked."""
    rows = await conn.fetch(
        "UPDATE scorer.items i SET second_opinion_requested = true, suspected_label = s.label"
        " FROM unnest($1::uuid[], $2::int[]) AS s(item_id, label)"
        " WHERE i.item_id = s.item_id AND NOT i.second_opinion_requested AND i.human_label IS NOT NULL"
        " RETURNING i.item_id, i.external_id, i.text, i.synthetic",
        [x[0] for x in suspected],
        [x[1] for x in suspected],
    )
    return [SecondOpinionItem(str(r["item_id"]), r["external_id"], r["text"], r["synthetic"]) for r in rows]


@dataclass(frozen=True)
class SecondOpinion:
    item_id: str
    first_label: int
    second_label: int
    suspected_label: int
    first_annotator: str


async def record_second_opinions(
    conn: asyncpg.Connection, opinions: Sequence[tuple[str, int, str]]
) -> list[SecondOpinion]:
    """Store second opinions once; where the second person sides with the model against the first,
    the item's human label becomes the second one. Returns the new opinions."""
    if not opinions:
        return []
    rows = await conn.fetch(
        "UPDATE scorer.items i SET second_label = o.label, first_label = i.human_label,"
        " human_label = CASE WHEN o.label = i.suspected_label THEN o.label ELSE i.human_label END"
        " FROM unnest($1::uuid[], $2::int[], $3::text[]) AS o(item_id, label, annotator)"
        " WHERE i.item_id = o.item_id AND i.second_opinion_requested AND i.second_label IS NULL"
        " RETURNING i.item_id, i.first_label, i.second_label, i.suspected_label, i.annotator_id",
        [x[0] for x in opinions],
        [x[1] for x in opinions],
        [x[2] for x in opinions],
    )
    return [
        SecondOpinion(
            str(r["item_id"]),
            r["first_label"],
            r["second_label"],
            r["suspected_label"],
            r["annotator_id"] or "",
        )
        for r in rows
    ]


async def insert_new(
    conn: asyncpg.Connection, project_id: str, items: Sequence[NewItem], decisions: Sequence[ItemDecision]
) -> set[str]:
    """Insert predicted items with their decisions; returns the ids that were new (idempotency)."""
    rows = await conn.fetch(
        "INSERT INTO scorer.items (item_id, project_id, external_id, text, synthetic, embedding, zero_shot,"
        " state, reason, predicted_label, confidence, priority, model_id, metadata)"
        " SELECT u.id, u.project, u.ext, u.txt, u.syn, u.emb, u.zs::real[], u.state, u.reason, u.label, u.conf,"
        " u.prio, u.model, u.meta::jsonb FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::boolean[],"
        " $6::bytea[], $7::text[], $8::text[], $9::text[], $10::int[], $11::real[], $12::real[], $13::text[],"
        " $14::text[]) AS u(id, project, ext, txt, syn, emb, zs, state, reason, label, conf, prio, model, meta)"
        " ON CONFLICT (item_id) DO NOTHING RETURNING item_id",
        [it.item_id for it in items],
        [project_id] * len(items),
        [it.external_id for it in items],
        [it.text for it in items],
        [it.synthetic for it in items],
        [np.ascontiguousarray(it.embedding, dtype=np.float32).tobytes() for it in items],
        # real[][] via unnest would flatten; the distribution goes through text and is cast back below.
        ["{" + ",".join(f"{p:.6g}" for p in it.zero_shot) + "}" for it in items],
        [d.state for d in decisions],
        [d.reason for d in decisions],
        [d.label for d in decisions],
        [d.confidence for d in decisions],
        [d.priority for d in decisions],
        [it.model_id for it in items],
        [json.dumps(it.metadata) for it in items],
    )
    return {str(r["item_id"]) for r in rows}


async def existing_ids(conn: asyncpg.Connection, item_ids: Sequence[str]) -> set[str]:
    rows = await conn.fetch(
        "SELECT item_id FROM scorer.items WHERE item_id = ANY($1::uuid[])", list(item_ids)
    )
    return {str(r["item_id"]) for r in rows}


@dataclass(frozen=True)
class Labeled:
    item_id: str
    embedding: np.ndarray
    zero_shot: np.ndarray
    label: int
    reason: str
    predicted_label: int
    weight: float = 1.0


async def record_human_labels(
    conn: asyncpg.Connection, labels: Sequence[tuple[str, int, str, float]]
) -> list[Labeled]:
    """Store human labels once; returns the ones that were new."""
    if not labels:
        return []
    rows = await conn.fetch(
        "UPDATE scorer.items i SET human_label = l.label, annotator_id = l.annotator, state = 'human',"
        " labeled_at = now(), human_weight = l.weight"
        " FROM unnest($1::uuid[], $2::int[], $3::text[], $4::real[]) AS l(item_id, label, annotator, weight)"
        " WHERE i.item_id = l.item_id AND i.human_label IS NULL"
        " RETURNING i.item_id, i.embedding, i.zero_shot, i.human_label, i.reason, i.predicted_label,"
        " i.human_weight",
        [x[0] for x in labels],
        [x[1] for x in labels],
        [x[2] for x in labels],
        [x[3] for x in labels],
    )
    return [
        Labeled(
            str(r["item_id"]),
            _vec(r["embedding"]),
            _probs(r["zero_shot"]),
            r["human_label"],
            r["reason"],
            r["predicted_label"],
            r["human_weight"],
        )
        for r in rows
    ]


@dataclass(frozen=True)
class StoredProposal:
    item_id: str
    batch: int
    label: int
    audit_prob: float
    audited: bool
    state: str  # pending | accepted | rejected
    confidence: float
    first_label: int | None  # the item's first human label, if any
    second_label: int | None  # a second opinion, if any
    second_requested: bool


async def load_proposals(conn: asyncpg.Connection, project_id: str) -> list[StoredProposal]:
    """Every proposal of the project in batch order, with what people said of its item."""
    rows = await conn.fetch(
        "SELECT p.item_id, p.batch, p.label, p.audit_prob, p.audited, p.state, p.confidence,"
        " coalesce(i.first_label, i.human_label) AS first, i.second_label, i.second_opinion_requested"
        " FROM scorer.proposals p JOIN scorer.items i ON i.item_id = p.item_id"
        " WHERE p.project_id = $1 ORDER BY p.batch, p.item_id",
        project_id,
    )
    return [
        StoredProposal(
            str(r["item_id"]),
            r["batch"],
            r["label"],
            r["audit_prob"],
            r["audited"],
            r["state"],
            r["confidence"],
            r["first"],
            r["second_label"],
            r["second_opinion_requested"],
        )
        for r in rows
    ]


async def save_proposals(
    conn: asyncpg.Connection,
    project_id: str,
    batch: int,
    entries: Sequence[tuple[str, int, float, bool, float, float]],
) -> None:
    """Record a proposed batch: (item id, label, audit probability, audited, confidence, priority).
    Audited items become audits: people get them first, and their label is compared with this one."""
    if not entries:
        return
    await conn.execute(
        "INSERT INTO scorer.proposals (project_id, batch, item_id, label, audit_prob, audited, confidence)"
        " SELECT $1, $2, e.item_id, e.label, e.pi, e.audited, e.conf"
        " FROM unnest($3::uuid[], $4::int[], $5::real[], $6::boolean[], $7::real[])"
        " AS e(item_id, label, pi, audited, conf) ON CONFLICT DO NOTHING",
        project_id,
        batch,
        [e[0] for e in entries],
        [e[1] for e in entries],
        [e[2] for e in entries],
        [e[3] for e in entries],
        [e[4] for e in entries],
    )
    audits = [e for e in entries if e[3]]
    if audits:
        await conn.execute(
            "UPDATE scorer.items i SET reason = 'audit', predicted_label = a.label, confidence = a.conf,"
            " priority = a.prio FROM unnest($1::uuid[], $2::int[], $3::real[], $4::real[])"
            " AS a(item_id, label, conf, prio) WHERE i.item_id = a.item_id AND i.state = 'review'",
            [e[0] for e in audits],
            [e[1] for e in audits],
            [e[4] for e in audits],
            [e[5] for e in audits],
        )


async def split_proposals(
    conn: asyncpg.Connection, project_id: str, splits: Sequence[tuple[int, int, list[str]]]
) -> None:
    """Move the handed-back part of accepted batches to batches of their own:
    (new batch, old batch, item ids)."""
    for new, old, item_ids in splits:
        await conn.execute(
            "UPDATE scorer.proposals SET batch = $2 WHERE project_id = $1 AND batch = $3"
            " AND item_id = ANY($4::uuid[])",
            project_id,
            new,
            old,
            item_ids,
        )


async def set_proposal_state(
    conn: asyncpg.Connection, project_id: str, batches: Sequence[int], state: str
) -> None:
    if batches:
        await conn.execute(
            "UPDATE scorer.proposals SET state = $3 WHERE project_id = $1 AND batch = ANY($2::int[])",
            project_id,
            list(batches),
            state,
        )


async def waiting_for_people(
    conn: asyncpg.Connection, project_id: str, *, all_but_synthetic: bool = False
) -> list[Waiting]:
    """Items in review that a refit may still decide: not audits, control or synthetic items (their
    point is that people label them), unless the budget is spent (then all but synthetic)."""
    excluded = ["synthetic"] if all_but_synthetic else list(PEOPLE_ONLY)
    rows = await conn.fetch(
        "SELECT item_id, embedding, zero_shot, priority,"
        " EXISTS (SELECT 1 FROM scorer.slice_flags f WHERE f.project_id = i.project_id"
        "  AND i.metadata->>f.field = f.value AND $3 = ANY(f.reasons)) AS flagged"
        " FROM scorer.items i WHERE project_id = $1 AND state = 'review' AND reason <> ALL($2::text[])",
        project_id,
        excluded,
        AUDITED_MORE,
    )
    return [
        Waiting(
            str(r["item_id"]),
            _vec(r["embedding"]),
            _probs(r["zero_shot"]),
            r["priority"],
            r["flagged"],
        )
        for r in rows
    ]


@dataclass(frozen=True)
class WaitingRows:
    """A page of waiting items as a refit needs them: no text (see services/scorer/waiting.py)."""

    item_ids: list[str]
    embeddings: np.ndarray
    zero_shot: np.ndarray
    priorities: list[float]
    flagged: list[bool]


async def waiting_pages(
    conn: asyncpg.Connection, project_id: str, page: int = 10_000
) -> AsyncIterator[WaitingRows]:
    """The items waiting_for_people returns, page by page through a cursor (a million rows of
    embeddings never sit in memory at once). Needs a transaction."""
    cursor = await conn.cursor(
        "SELECT item_id, embedding, zero_shot, priority,"
        " EXISTS (SELECT 1 FROM scorer.slice_flags f WHERE f.project_id = i.project_id"
        "  AND i.metadata->>f.field = f.value AND $3 = ANY(f.reasons)) AS flagged"
        " FROM scorer.items i WHERE project_id = $1 AND state = 'review' AND reason <> ALL($2::text[])",
        project_id,
        list(PEOPLE_ONLY),
        AUDITED_MORE,
    )
    while rows := await cursor.fetch(page):
        yield WaitingRows(
            [str(r["item_id"]) for r in rows],
            np.vstack([_vec(r["embedding"]) for r in rows]),
            np.vstack([_probs(r["zero_shot"]) for r in rows]),
            [r["priority"] for r in rows],
            [r["flagged"] for r in rows],
        )


async def accept_waiting(
    conn: asyncpg.Connection,
    accepted: Sequence[tuple[str, int, float]],
    model_id: str,
    *,
    state: str = "auto",
    reason: str = "certified",
) -> set[str]:
    """Finalize waiting items with the model's label; returns those that were still waiting at this
    moment (a human label may have won)."""
    rows = await conn.fetch(
        "UPDATE scorer.items i SET state = $5, reason = $6, withdrawn = true,"
        " predicted_label = a.label, confidence = a.confidence, model_id = $4, decided_at = now()"
        " FROM unnest($1::uuid[], $2::int[], $3::real[]) AS a(item_id, label, confidence)"
        " WHERE i.item_id = a.item_id AND i.state = 'review'"
        " RETURNING i.item_id",
        [a[0] for a in accepted],
        [a[1] for a in accepted],
        [a[2] for a in accepted],
        model_id,
        state,
        reason,
    )
    return {str(r["item_id"]) for r in rows}


async def count_items(conn: asyncpg.Connection, project_id: str) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM scorer.items WHERE project_id = $1", project_id))


async def update_priorities(conn: asyncpg.Connection, changes: Sequence[tuple[str, float]]) -> None:
    await conn.execute(
        "UPDATE scorer.items i SET priority = c.priority FROM unnest($1::uuid[], $2::real[]) AS c(item_id, priority)"
        " WHERE i.item_id = c.item_id AND i.state = 'review'",
        [c[0] for c in changes],
        [c[1] for c in changes],
    )


async def publish(conn: asyncpg.Connection, outgoing: Sequence[Outgoing]) -> None:
    await enqueue(conn, SCHEMA, outgoing)


@dataclass(frozen=True)
class Counts:
    predicted: int
    auto: int
    in_review: int
    human: int
    audits: int
    withdrawn: int
    audited: int
    audit_correct: int
    below_target: int
    control: int
    second_opinions: int
    relabeled: int
    pending: int


async def counts(conn: asyncpg.Connection, project_id: str) -> Counts:
    row = await conn.fetchrow(
        "SELECT count(*) AS predicted,"
        " count(*) FILTER (WHERE state = 'auto') AS auto,"
        " count(*) FILTER (WHERE state = 'review') AS in_review,"
        " count(*) FILTER (WHERE state = 'human') AS human,"
        " count(*) FILTER (WHERE reason = 'audit') AS audits,"
        " count(*) FILTER (WHERE withdrawn) AS withdrawn,"
        " count(*) FILTER (WHERE reason = 'audit' AND human_label IS NOT NULL) AS audited,"
        " count(*) FILTER (WHERE reason = 'audit' AND human_label = predicted_label) AS audit_correct,"
        " count(*) FILTER (WHERE state = 'model') AS below_target,"
        " count(*) FILTER (WHERE reason = 'control') AS control,"
        " count(*) FILTER (WHERE second_opinion_requested) AS second_opinions,"
        " count(*) FILTER (WHERE second_label IS NOT NULL AND second_label <> first_label"
        "  AND second_label = suspected_label) AS relabeled,"
        " (SELECT count(*) FROM scorer.proposals p WHERE p.project_id = $1 AND p.state = 'pending'"
        "  AND NOT p.audited) AS pending"
        " FROM scorer.items WHERE project_id = $1",
        project_id,
    )
    assert row is not None
    return Counts(**dict(row))


async def labeled_examples(
    conn: asyncpg.Connection, project_id: str, limit: int
) -> list[tuple[str, str, int]]:
    """(item_id, text, label) of recent human-labeled items, the pool few-shot demos come from."""
    rows = await conn.fetch(
        "SELECT item_id, text, human_label FROM scorer.items WHERE project_id = $1 AND human_label IS NOT NULL"
        " ORDER BY labeled_at DESC LIMIT $2",
        project_id,
        limit,
    )
    return [(str(r["item_id"]), r["text"], r["human_label"]) for r in rows]


async def replace_slice_flags(
    conn: asyncpg.Connection,
    project_id: str,
    fields: Sequence[str],
    flagged: Sequence[tuple[str, str, list[str]]],
    reported_at: datetime,
) -> None:
    """A report's flags for the fields it covered: (field, value, reasons). A slice still flagged
    keeps the time it was first flagged; one no longer flagged is dropped; a report older than the
    one applied last for a field changes nothing of that field."""
    for f in fields:
        newest = await conn.fetchval(
            "SELECT max(reported_at) FROM scorer.slice_flags WHERE project_id = $1 AND field = $2",
            project_id,
            f,
        )
        if newest is not None and newest > reported_at:
            continue
        values = [v for field_, v, _ in flagged if field_ == f]
        await conn.execute(
            "DELETE FROM scorer.slice_flags WHERE project_id = $1 AND field = $2 AND value <> ALL($3::text[])",
            project_id,
            f,
            values,
        )
        for field_, value, reasons in flagged:
            if field_ != f:
                continue
            await conn.execute(
                "INSERT INTO scorer.slice_flags (project_id, field, value, reasons, reported_at)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (project_id, field, value)"
                " DO UPDATE SET reasons = EXCLUDED.reasons, reported_at = EXCLUDED.reported_at",
                project_id,
                f,
                value,
                reasons,
                reported_at,
            )


async def slice_flags(conn: asyncpg.Connection, project_id: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT field, value, reasons, flagged_at FROM scorer.slice_flags WHERE project_id = $1"
        " AND $2 = ANY(reasons) ORDER BY 1, 2",
        project_id,
        AUDITED_MORE,
    )
    return rows


# Session advisory locks of the scorer's project leases (services/scorer/leases.py): a namespace
# of their own beside the project's hashed id.
_LEASE_NAMESPACE = "tandem.scorer.project"


async def try_lease_project(conn: asyncpg.Connection, project_id: str) -> bool:
    ok: bool = await conn.fetchval(
        "SELECT pg_try_advisory_lock(hashtext($1), hashtext($2))", _LEASE_NAMESPACE, project_id
    )
    return ok


async def release_project(conn: asyncpg.Connection, project_id: str) -> None:
    await conn.fetchval("SELECT pg_advisory_unlock(hashtext($1), hashtext($2))", _LEASE_NAMESPACE, project_id)
