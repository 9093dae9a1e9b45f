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
└── OWN_LABEL                   nothing: a second opinion must come from someone else

A task moves open → leased → done, or → withdrawn when it is no longer needed: at once if it
is open (or arrives after its withdrawal), at the end of its lease if it is leased (the holder
may still answer, and that answer counts). The SQL that ends leases in bulk (repo.expire_leases)
applies the same `state_after_lease`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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


@dataclass(frozen=True)
class PriorLabel:
    """A label someone gave to a task of the same item (any round)."""

    round: int
    annotator_id: str


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
        if PriorLabel(task.round, claim.annotator_id) in prior:
            return Submit.ALREADY_RECORDED
        raise Refused(Reason.ALREADY_LABELED, "the task already has its label, from someone else")
    check_lease(task, claim)
    if labeled_other_round(task.round, claim.annotator_id, prior):
        raise Refused(
            Reason.OWN_LABEL,
            "you already labeled this item in another round: a second opinion must come from someone else",
        )
    return Submit.RECORD


def labeled_other_round(round_: int, annotator_id: str, prior: Iterable[PriorLabel]) -> bool:
    """One person, one label per item: whichever round they answer first, they cannot also
    answer another (a first label after one's own second opinion confirms oneself just the same)."""
    return any(p.round != round_ and p.annotator_id == annotator_id for p in prior)


def state_after_lease(task: Task) -> State:
    """Where a task goes when its lease ends without a label (skipped or expired)."""
    return State.WITHDRAWN if task.withdraw_requested else State.OPEN


def lease_seconds(requested: float, default: float, maximum: float) -> float:
    """The lease a NextTask or ExtendLease gets: the default for 0 (or nonsense), never above the cap."""
    if not requested > 0:  # also NaN
        return min(default, maximum)
    return min(requested, maximum)


# Tasks that measure the model or a person: a suggestion would anchor the answer on what is measured.
BLIND_REASONS = frozenset({"audit", "second_opinion", "control", "gold"})


def shows_suggestion(task: Task, project_hides_suggestions: bool) -> bool:
    return not project_hides_suggestions and task.round == 0 and task.reason not in BLIND_REASONS
