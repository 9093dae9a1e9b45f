"""Pure rules of the review service: who may label, give back or extend a task. No I/O.

Handlers read a task (locked) and the labels its item already has, ask these functions, and
map a refusal's `Reason` to a gRPC status; nothing here knows about gRPC or SQL.

Refused(reason)                 what the client can do
├── NO_TASK                     nothing: the task id names no task (raised where tasks are read)
├── UNKNOWN_LABEL               send one of the project's labels
├── NOT_LEASED                  take the task with NextTask first (it is open)
├── LEASE_HELD_BY_OTHER         take another task: someone else is on this one
├── LEASE_STALE                 use the lease of the caller's latest NextTask for this task
├── LEASE_EXPIRED               take the next task: the lease ran out (the task is back in the queue)
├── ALREADY_LABELED             nothing: the task already has its label
├── WITHDRAWN                   nothing: the task is no longer needed
├── OWN_LABEL                   nothing: one person gives one label per item
├── PAUSED                      ask a manager: the gold check (or a manager) paused the person here
├── NOT_IN_POOL                 ask a manager: the person's pool does not work on this project
├── AT_CAPACITY                 finish or give back a task first
└── POOL_AT_CAPACITY            wait: the pool holds as many tasks as it may

A task moves open → leased → done, or → withdrawn when it is no longer needed: at once if it
is open (or arrives after its withdrawal), at the end of its lease if it is leased (the holder
may still answer, and that answer counts). The SQL that ends leases in bulk (repo.expire_leases)
applies the same `state_after_lease`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class State(StrEnum):
    OPEN = "open"
    LEASED = "leased"
    DONE = "done"
    WITHDRAWN = "withdrawn"


@dataclass(frozen=True)
class Task:
    task_id: str
    item_id: str
    project_id: str
    external_id: str
    text: str
    suggested_label: str
    confidence: float
    reason: str
    synthetic: bool
    state: State
    lease_id: str | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    round: int
    # A withdrawal came while the task was leased: when the lease ends unanswered, it is withdrawn.
    withdraw_requested: bool = False
    slot: int = 0  # with overlap, the item's k tasks in one round are slots 0..k-1
    pool_id: str = ""  # the pool it waits for ("" = anyone allowed on the project)
    gold: bool = False  # a gold question (review.gold_tasks), never published as a label


@dataclass(frozen=True)
class PriorLabel:
    """A label someone gave to a task of the same item (any round or slot)."""

    round: int
    annotator_id: str
    slot: int = 0


@dataclass(frozen=True)
class LeaseClaim:
    """Who asks, with which lease, when (the database's clock, the one leases are set by)."""

    annotator_id: str
    lease_id: str
    now: datetime


class Reason(StrEnum):
    NO_TASK = "no_task"
    UNKNOWN_LABEL = "unknown_label"
    NOT_LEASED = "not_leased"
    LEASE_HELD_BY_OTHER = "lease_held_by_other"
    LEASE_STALE = "lease_stale"
    LEASE_EXPIRED = "lease_expired"
    ALREADY_LABELED = "already_labeled"
    WITHDRAWN = "withdrawn"
    OWN_LABEL = "own_label"
    PAUSED = "paused"
    NOT_IN_POOL = "not_in_pool"
    AT_CAPACITY = "at_capacity"
    POOL_AT_CAPACITY = "pool_at_capacity"


class Refused(Exception):
    """A request the rules turn down; `reason` is for the edge, the message for the person."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Submit(StrEnum):
    RECORD = "record"  # a new label: store it and publish it
    ALREADY_RECORDED = "already_recorded"  # a retry of the caller's own accepted submit


def check_lease(task: Task, claim: LeaseClaim) -> None:
    """Passes if `claim` is the task's current lease: for SkipTask, ExtendLease and SubmitLabel."""
    if task.state is State.OPEN:
        raise Refused(Reason.NOT_LEASED, "the task is not leased to you: take it with NextTask first")
    if task.state is State.DONE:
        raise Refused(Reason.ALREADY_LABELED, "the task already has its label")
    if task.state is State.WITHDRAWN:
        raise Refused(Reason.WITHDRAWN, "the task was withdrawn: it no longer needs a label")
    if task.lease_owner != claim.annotator_id:
        raise Refused(
            Reason.LEASE_HELD_BY_OTHER, "the task is leased to someone else: take another with NextTask"
        )
    if task.lease_id != claim.lease_id:
        raise Refused(
            Reason.LEASE_STALE,
            "that lease is no longer current: use the lease_id of your latest NextTask for this task",
        )
    if task.lease_expires_at is not None and task.lease_expires_at <= claim.now:
        raise Refused(
            Reason.LEASE_EXPIRED,
            "your lease has expired: take the next task with NextTask",
        )


def check_submit(
    task: Task,
    claim: LeaseClaim,
    label: str,
    labels: Sequence[str],
    prior: Iterable[PriorLabel],
) -> Submit:
    """Whether a label is recorded: only from the holder of the task's current lease, never from
    someone who labeled another round of the item; a retry of an accepted submit is answered again."""
    if label not in labels:
        raise Refused(Reason.UNKNOWN_LABEL, f"label {label!r} is not one of {', '.join(labels)}")
    prior = list(prior)
    if task.state is State.DONE:
        if PriorLabel(task.round, claim.annotator_id, task.slot) in prior:
            return Submit.ALREADY_RECORDED
        raise Refused(Reason.ALREADY_LABELED, "the task already has its label, from someone else")
    check_lease(task, claim)
    if labeled_other_task(task.round, task.slot, claim.annotator_id, prior):
        raise Refused(
            Reason.OWN_LABEL,
            "you already labeled this item: a second opinion or another overlap label must come from"
            " someone else",
        )
    return Submit.RECORD


def labeled_other_task(round_: int, slot: int, annotator_id: str, prior: Iterable[PriorLabel]) -> bool:
    """One person, one label per item: whichever task of the item (round, overlap slot) they answer
    first, they cannot also answer another (a first label after one's own second opinion confirms
    oneself just the same; two overlap labels from one person are one opinion counted twice)."""
    return any((p.round, p.slot) != (round_, slot) and p.annotator_id == annotator_id for p in prior)


def state_after_lease(task: Task) -> State:
    """Where a task goes when its lease ends without a label (skipped or expired)."""
    return State.WITHDRAWN if task.withdraw_requested else State.OPEN


def lease_seconds(requested: float, default: float, maximum: float) -> float:
    """The lease a NextTask or ExtendLease gets: the default for 0 (or nonsense), never above the cap."""
    if not requested > 0:  # also NaN
        return min(default, maximum)
    return min(requested, maximum)


# Tasks that measure the model or a person: a suggestion would anchor the answer on what is measured.
# Items of a batch handed back to people measure the model as its audits do (their disagreements
# pay back the audits' in the certificate), so they are asked the same way, without the model's label.
BLIND_REASONS = frozenset({"audit", "handed_back", "second_opinion", "label_error", "control", "gold"})


def shows_suggestion(task: Task, project_hides_suggestions: bool) -> bool:
    return not project_hides_suggestions and task.round == 0 and task.reason not in BLIND_REASONS


# -- Routing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Person:
    """Someone asking for work, as the claim sees them (locked for the claim's transaction)."""

    annotator_id: str
    pool_id: str
    skills: tuple[str, ...]
    max_leased: int  # 0 = the service default
    leased: int  # tasks they hold now (gold questions included)


@dataclass(frozen=True)
class Standing:
    """A person on a project."""

    served: int = 0
    gold_served: int = 0
    gold_answered: int = 0
    gold_correct: int = 0
    paused: bool = False
    paused_reason: str = ""


def queue_for(project_pools: Sequence[str], person: Person, standing: Standing) -> str:
    """The pool whose queue the person takes from ("" when the project names no pools: anyone).
    Refused when they are paused here or their pool does not work on the project."""
    if standing.paused:
        raise Refused(
            Reason.PAUSED,
            f"you are paused on this project ({standing.paused_reason or 'by a manager'}): ask a manager",
        )
    if not project_pools:
        return ""
    if person.pool_id not in project_pools:
        where = f"pool {person.pool_id!r}" if person.pool_id else "no pool"
        raise Refused(
            Reason.NOT_IN_POOL,
            f"this project is worked by pools {', '.join(project_pools)}; you are in {where}",
        )
    return person.pool_id


def check_capacity(person: Person, default_max: int, pool_leased: int | None, pool_max: int) -> None:
    """At most max_leased tasks per person and per pool at once (pool_leased None = no pool cap)."""
    cap = person.max_leased or default_max
    if cap and person.leased >= cap:
        raise Refused(
            Reason.AT_CAPACITY, f"you hold {person.leased} tasks (at most {cap}): finish or give one back"
        )
    if pool_leased is not None and pool_max and pool_leased >= pool_max:
        raise Refused(
            Reason.POOL_AT_CAPACITY,
            f"your pool holds {pool_leased} tasks, as many as it may ({pool_max}): try again shortly",
        )


def pool_for_task(task_id: str, pools: Sequence[tuple[str, float]]) -> str:
    """The pool a task is routed to: drawn by the project's shares from a hash of the task id, so
    the same task always lands in the same pool (a redelivered request changes nothing) and each
    pool gets its share of tasks."""
    if not pools:
        return ""
    total = sum(share for _, share in pools)
    digest = hashlib.blake2b(task_id.encode(), digest_size=8).digest()
    point = int.from_bytes(digest, "big") / 2**64 * total
    for pool_id, share in pools:
        point -= share
        if point < 0:
            return pool_id
    return pools[-1][0]


def skills_for(fields: Sequence[str], metadata: Mapping[str, str]) -> list[str]:
    """The skills an item needs: "field=value" for each of the project's skill fields it carries."""
    return [f"{f}={metadata[f]}" for f in fields if metadata.get(f, "")]


# -- Gold questions ----------------------------------------------------------------------------

GOLD_FIRST = 30
GOLD_FIRST_SHARE = 0.5
GOLD_SHARE = 0.1
QUALITY_BAR = 0.7
# Gold answers before the bar is applied: fewer say too little to pause anyone.
MIN_GOLD_ANSWERS = 5


@dataclass(frozen=True)
class GoldPolicy:
    first: int
    first_share: float
    share: float
    bar: float

    @classmethod
    def of(cls, first: int, first_share: float, share: float, bar: float) -> GoldPolicy:
        """A project's settings, 0 meaning the default."""
        return cls(
            first or GOLD_FIRST, first_share or GOLD_FIRST_SHARE, share or GOLD_SHARE, bar or QUALITY_BAR
        )


def wants_gold(policy: GoldPolicy, standing: Standing, draw: float) -> bool:
    """Whether the next task is a gold question; `draw` is uniform in [0, 1). New people get gold
    often (their quality is unknown and the sooner a bad one is found the less is lost), then a
    steady share that keeps measuring everyone. Random, so gold cannot be told apart by position."""
    share = policy.first_share if standing.served < policy.first else policy.share
    return draw < share


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion; (0, 1) with no answers."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    denom = 1 + z * z / n
    return max(0.0, (centre - half) / denom), min(1.0, (centre + half) / denom)


# One-sided 95%: the decision is one-sided (is their accuracy below the bar?).
PAUSE_Z = 1.645


def below_bar(correct: int, answered: int, bar: float) -> bool:
    """Pause a person when even a one-sided 95% upper bound on their gold accuracy (Wilson) is under
    the bar: an honest person who is unlucky on a few questions is not paused on evidence that thin,
    while someone answering at random is, within a dozen gold questions."""
    if answered < MIN_GOLD_ANSWERS:
        return False
    return wilson(correct, answered, PAUSE_Z)[1] < bar


# -- Overlap -----------------------------------------------------------------------------------


def slots_needed(overlap: int, max_overlap: int, below_confidence: float, confidence: float) -> int:
    """People an item starts with: the project's overlap, one more when the model was far from
    confident (and the dynamic rule allows more)."""
    k = max(overlap, 1)
    if below_confidence > 0 and confidence < below_confidence and max_overlap > k:
        return k + 1
    return k


class Settle(StrEnum):
    WAIT = "wait"  # labels still to come
    ONE_MORE = "one_more"  # ask one more person
    FINAL = "final"  # aggregate


@dataclass(frozen=True)
class SlotState:
    slot: int
    state: State
    annotator_id: str | None  # who labeled it (done slots)
    label: str | None


def settle(slots: Sequence[SlotState], needed: int, max_overlap: int, paused: Iterable[str]) -> Settle:
    """What happens after a label on an item with overlap: wait for the labels still out; replace
    the labels of paused people (they no longer count) until `needed` people count; ask one more
    person while the counted labels disagree, up to max_overlap; else aggregate. An item some of
    whose tasks were withdrawn settles with the labels it has."""
    if any(s.state in (State.OPEN, State.LEASED) for s in slots):
        return Settle.WAIT
    paused = set(paused)
    done = [s for s in slots if s.state is State.DONE]
    counted = [s.label for s in done if s.annotator_id not in paused]
    if not done:
        return Settle.WAIT
    if any(s.state is State.WITHDRAWN for s in slots):
        return Settle.FINAL
    room = len(slots) < MAX_SLOTS
    if len(counted) < needed and room:
        return Settle.ONE_MORE
    if len(set(counted)) > 1 and len(counted) < max_overlap and room:
        return Settle.ONE_MORE
    return Settle.FINAL


# Tasks one item may have in its first round, replacements for paused people included.
MAX_SLOTS = 12
