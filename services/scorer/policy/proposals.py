"""Proposals for automatic acceptance: which items, how many at once, which of them people audit,
and when a proposed batch is accepted or handed back to people.

Pure domain code, no I/O. The scorer service and the offline harness (loadtests/al_offline.py) drive
the same `ProposalBook`. Acceptance never rests on a rule of thumb: a batch is accepted only when the
certificate (certification.py), with every pending audit counted as a disagreement, still meets the
target with the batch's items counted as automatic labels. How much is proposed at once is planned
from the model's own estimate of its errors, which decides cost, never validity: a batch the audits
refute is handed back to people, whose labels then reveal its disagreements exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import numpy as np

from services.scorer.policy.certification import (
    ACCEPTED_BATCH,
    PENDING_BATCH,
    REJECTED_BATCH,
    Assumptions,
    Certificate,
    Guarantee,
    Ledger,
    Tally,
    certify,
    error_bounds,
    human_error_estimate,
    lower_bound,
    planned_upper,
    sequence_upper,
)

PENDING, ACCEPTED, REJECTED = "pending", "accepted", "rejected"
# Audit floor: this many audits per wrong label the target leaves room for (see audit_floor)...
AUDITS_PER_ROOM = 20.0
# ...while the audits disagree at most this often; a model whose audits disagree more gets
# proportionally more, up to MAX_AUDIT_SCALE times as many. Every audited disagreement costs the
# bound about 1/pi wrong labels, and its fixed cost is about 5/pi of the smallest pi accepted: a
# model that errs more needs the larger pi to certify anything, from its first batch on (the
# disagreement rate's prior of 1% starts every project at twice the floor). Measured (offline,
# target 0.95, mean human share, 10 seeds): a fixed 40 audits per room instead of 20 took AG News
# from 0.830 to 0.672 and SMS Spam, whose audits almost never disagree, from 0.224 to 0.349; this
# rule: AG News 0.672, SMS Spam 0.248 (median 0.229). Audits that disagree less often than that get
# fewer, down to MIN_AUDIT_SCALE times as many (the rate is read before the next batch's draws, and
# its prior keeps the first batches at twice the floor): SMS Spam, whose audits disagree about once
# in 400, in a blind project went from 0.173 / 0.190 to 0.166 / 0.155 human at 0.95 and from 0.342 /
# 0.358 to 0.299 / 0.304 at 0.98 (offline, seeds 0 / 1); AG News, whose audits disagree at ~5%, is
# unchanged. 0.4 of the floor for every pool (8 audits per room) had cost SMS Spam 0.7 at 0.95.
AUDIT_BASE_RATE = 0.005
MIN_AUDIT_SCALE = 0.6
MAX_AUDIT_SCALE = 4.0
# A batch gets at least this many audits in expectation: one with none would be accepted on the
# strength of the other batches' audits alone.
MIN_BATCH_AUDITS = 10.0
# Sizes tried when accepting part of a batch.
_SPLIT_STEPS = 12
# Sizes tried when planning a proposal, as shares of the candidates (largest that fits wins).
_PLAN_STEPS = 24
# No proposal smaller than this (unless fewer candidates are left): a tiny batch spends the audits'
# fixed cost on next to nothing.
MIN_BATCH = 10
# The allocation of the target's room (ProposalBook.allocation_cap) may reach items estimated this
# many times likelier wrong than the target allows per item, no further: the model's estimates are
# least trustworthy there. Unbounded, on CLINC150 a batch of 1,542 items estimated up to 37% wrong
# drew 49 disagreements in 500 audits and went back to people whole (offline, target 0.95, mean
# human share over seeds 0-5: 0.511 against 0.437 before the allocation, 0.437 with this bound,
# which keeps most of the gain elsewhere: AG News 0.672 -> 0.633, Banking77 0.707 -> 0.635).
ALLOCATION_STRETCH = 2.0
# Planning floors each candidate's estimated disagreement at this share of the audits' disagreement
# rate (whose prior is 1%): the model's probabilities saturate near 1. Half of it made a 0.98
# target on SMS Spam (people at 2%) unplannable: 4,575 candidates at 0.5% each planned to 0.9787;
# at a quarter the same pool planned above 0.98 and two seeds in ten were certified (offline; the
# 0.95 runs of AG News and SMS Spam unchanged but for one seed).
PLANNING_FLOOR = 0.25
# Human labels a batch waits for second opinions on its disagreeing audits before it is settled
# with them counted as disagreements (a project with one annotator never gets any).
ADJUDICATION_PATIENCE = 100


def unit_draw(item_id: str, salt: str = "audit") -> float:
    """A uniform draw in [0, 1) fixed by the item id, so a redelivered item gets the same decision.
    The policy never looks at it before fixing the item's audit probability."""
    digest = hashlib.sha256(f"{salt}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def audit_floor(
    configured: float,
    target: float,
    expected_items: int,
    human_error: float = 0.0,
    disagreement_rate: float = AUDIT_BASE_RATE,
) -> float:
    """The smallest audit probability: the project's audit rate when set, else sized to the pool
    and to how often the audits so far disagreed (ProposalBook.disagreement_rate; fixed before the
    next batch's draws, so the certificate stays valid).

    No bound can rule out errors that were never audited: with audit probability pi the smallest
    certifiable count of unseen errors is about log(1/delta) / pi whatever the audits show. So pi is
    sized to the wrong labels the target leaves room for beside people's own (about
    AUDITS_PER_ROOM / ((1 - target - human_error) n)): a fixed number of audits, a shrinking share
    of a growing pool.
    """
    if configured > 0:
        return float(min(configured, 1.0))
    room = max((1.0 - target - human_error) * max(expected_items, 1), 1.0)
    scale = float(np.clip(disagreement_rate / AUDIT_BASE_RATE, MIN_AUDIT_SCALE, MAX_AUDIT_SCALE))
    return float(np.clip(AUDITS_PER_ROOM * scale / room, 0.01, 0.3))


def audit_probability(disagree_prob: np.ndarray, floor: float) -> np.ndarray:
    """Audit likelier errors more often (the bound's cost of an audited error falls as 1/pi)."""
    return np.clip(np.maximum(floor, 2.0 * np.asarray(disagree_prob, dtype=np.float64)), floor, 1.0)


@dataclass
class Entry:
    item_id: str
    batch: int
    label: int
    audit_prob: float
    audited: bool
    # Disagreement with people: None until settled. An audit settles it with the first label when
    # it agrees and with a second person's label when it does not (the disagreement stands unless
    # they side with the model); an item handed back to people with its one label.
    disagreed: bool | None = None
    adjudicating: bool = False
    confidence: float = 0.0  # the model's probability of `label` when proposed


@dataclass(frozen=True)
class Plan:
    rows: np.ndarray  # indices into the candidates, proposed in this order
    audit_prob: np.ndarray
    predicted_lower_bound: float


@dataclass
class ProposalBook:
    """Every item ever proposed, its audit draw and outcome, and each batch's fate."""

    assumptions: Assumptions
    entries: list[Entry] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    batch_state: dict[int, str] = field(default_factory=dict)
    # Batches handed back as the tail of another: their number → the batch they were part of.
    split_from: dict[int, int] = field(default_factory=dict)
    # (accepted batches, smallest sequence bound seen while they were the accepted ones)
    _best: tuple[int, float] | None = None
    _trial_upper: float = 0.0  # the sequence bound of the last trial certificate
    _head_upper: float = 0.0  # ... of the last part of a batch tried for acceptance
    # Human labels when a batch was proposed / handed back (after a restart: counted from then).
    proposed_at: dict[int, int] = field(default_factory=dict)
    rejected_at: dict[int, int] = field(default_factory=dict)

    # -- bookkeeping ----------------------------------------------------------------------------

    @property
    def next_batch(self) -> int:
        return max(self.batch_state, default=0) + 1

    def add(self, entry: Entry, state: str = PENDING) -> None:
        """Record a proposal (an item handed back may be proposed again later: a new entry)."""
        row = self.index.get(entry.item_id)
        if row is not None and self.entries[row].batch == entry.batch:
            return
        self.index[entry.item_id] = len(self.entries)
        self.entries.append(entry)
        self.batch_state.setdefault(entry.batch, state)

    def proposable(self, item_id: str, n_labels: int) -> bool:
        """Never proposed, or handed back and the model has since learned from half again as many
        labels (right after a hand-back the model still believes what its audits refuted)."""
        row = self.index.get(item_id)
        if row is None:
            return True
        batch = self.entries[row].batch
        if self.batch_state[batch] != REJECTED:
            return False
        return n_labels >= 1.5 * self.rejected_at.get(batch, n_labels) and n_labels > self.rejected_at.get(
            batch, n_labels
        )

    def record_label(self, item_id: str, label: int) -> bool:
        """A human label arrived for a proposed item (an audit, or an item handed back to people).
        Returns True when it disagrees with the model: the caller asks a second person
        (record_second_opinion settles it). Settled the same way whether the draw audited the item
        or not, the disagreement is one quantity the certificate can bet on either way."""
        row = self.index.get(item_id)
        if row is None:
            return False
        entry = self.entries[row]
        if entry.disagreed is not None or entry.adjudicating:
            return False
        if label != entry.label:
            entry.adjudicating = True
            return True
        entry.disagreed = label != entry.label
        return False

    def record_second_opinion(self, item_id: str, label: int) -> None:
        row = self.index.get(item_id)
        if row is None:
            return
        entry = self.entries[row]
        if entry.adjudicating and entry.disagreed is None:
            entry.disagreed = label != entry.label

    def batch(self, batch: int) -> list[Entry]:
        return [e for e in self.entries if e.batch == batch]

    def latest(self, item_id: str) -> Entry | None:
        row = self.index.get(item_id)
        return None if row is None else self.entries[row]

    def ledger(self) -> Ledger:
        if not self.entries:
            return Ledger.empty()
        codes = {PENDING: PENDING_BATCH, ACCEPTED: ACCEPTED_BATCH, REJECTED: REJECTED_BATCH}
        e = self.entries
        return Ledger(
            np.array([x.audit_prob for x in e], dtype=np.float64),
            np.array([x.audited for x in e], dtype=bool),
            # A pending audit counts as a disagreement until it is settled.
            np.array([1.0 if x.disagreed is None and x.audited else float(bool(x.disagreed)) for x in e]),
            np.array([not x.audited and x.disagreed is not None for x in e], dtype=bool),
            np.array([x.batch for x in e], dtype=np.int64),
            np.array([codes[self.batch_state[x.batch]] for x in e], dtype=np.int8),
        )

    def audits(self) -> tuple[int, int]:
        """(audit labels in, of which disagreed)."""
        done = [e.disagreed for e in self.entries if e.audited and e.disagreed is not None]
        return len(done), sum(done)

    # -- the certificate ------------------------------------------------------------------------

    def certificate(self, tally: Tally) -> Certificate:
        """The certificate now. Every bound of the sequence holds at once, so while the accepted set
        stays the same the smallest bound seen so far stands (a pending batch or one handed back
        raises the current bound, never the number of wrong labels already accepted)."""
        ledger = self.ledger()
        accepted = sum(1 for state in self.batch_state.values() if state == ACCEPTED)
        upper = sequence_upper(ledger, self.assumptions)
        if self._best is not None and self._best[0] == accepted:
            upper = min(upper, self._best[1])
        self._best = (accepted, upper)
        return certify(ledger, tally, self.assumptions, upper)

    def _trial_certificate(self, tally: Tally) -> Certificate:
        """The certificate if the batches marked accepted now were (no memory of earlier bounds)."""
        ledger = self.ledger()
        upper = sequence_upper(ledger, self.assumptions)
        self._trial_upper = upper
        return certify(ledger, tally, self.assumptions, upper)

    def settle(self, tally: Tally, n_labels: int = 0) -> tuple[list[int], list[int]]:
        """Settle every pending batch whose audits are all in, oldest first: accept the largest
        most-confident part of it the certificate allows and hand the rest back to people (as a
        batch of its own, numbered next). Returns (accepted, rejected) batches.

        Accepting part of a batch keeps the certificate valid: the part handed back enters it as
        min(0, its log-wealth), below the factor it replaces, whatever decided the split.
        `tally.human` counts every item not decided yet as a future human label, so a batch is
        accepted only if the dataset would still meet the target when people label the rest."""
        accepted: list[int] = []
        rejected: list[int] = []
        auto = tally.auto
        for batch in sorted(b for b, s in self.batch_state.items() if s == PENDING):
            entries = self.batch(batch)
            if any(e.audited and e.disagreed is None and not e.adjudicating for e in entries):
                # Never accepted blind: a batch waits for the first label of every audit.
                continue
            adjudicating = sum(1 for e in entries if e.adjudicating and e.disagreed is None)
            waited = n_labels - self.proposed_at.get(batch, n_labels)
            patient = adjudicating and waited < max(ADJUDICATION_PATIENCE, 4 * adjudicating)
            head = self._acceptable_head(batch, entries, tally, auto)
            if patient and len(head) < len(entries):
                # A second opinion may still side with the model: settle only once it is in,
                # unless the whole batch passes with those audits counted as disagreements.
                continue
            if head:
                tail = entries[len(head) :]
                self.batch_state[batch] = ACCEPTED
                accepted.append(batch)
                auto += sum(1 for e in head if not e.audited)
                if tail:
                    rejected.append(self._split_off(batch, tail, n_labels))
                # The bound the acceptance rested on starts the memory of the new accepted set (a
                # batch proposed next raises the bound while its audits are pending).
                accepted_batches = sum(1 for state in self.batch_state.values() if state == ACCEPTED)
                self._best = (accepted_batches, self._head_upper)
            else:
                self.batch_state[batch] = REJECTED
                self.rejected_at[batch] = n_labels
                rejected.append(batch)
        return accepted, rejected

    def _acceptable_head(self, batch: int, entries: list[Entry], tally: Tally, auto: int) -> list[Entry]:
        """The largest most-confident part of a batch (the whole of it, or at least MIN_BATCH
        items) whose acceptance the certificate allows and whose own audits agree; [] if none."""
        ranked = sorted(entries, key=lambda e: -e.confidence)
        sizes = np.unique(np.geomspace(min(MIN_BATCH, len(ranked)), len(ranked), _SPLIT_STEPS).astype(int))
        spare = self.next_batch
        for m in sizes[::-1].tolist():
            head, tail = ranked[:m], ranked[m:]
            unaudited = sum(1 for e in head if not e.audited)
            trial = replace(tally, auto=auto + unaudited, human=max(tally.human - unaudited, 0))
            for e in tail:
                e.batch = spare
            self.batch_state[batch] = ACCEPTED
            self.batch_state[spare] = REJECTED
            ok = self._looks_right(head) and self._trial_certificate(trial).met
            self._head_upper = self._trial_upper
            for e in tail:
                e.batch = batch
            self.batch_state[batch] = PENDING
            del self.batch_state[spare]
            if ok:
                # Keep the batch's entries in confidence order from here on (see _split_off).
                entries[:] = ranked
                return head
        return []

    def _split_off(self, batch: int, tail: list[Entry], n_labels: int) -> int:
        """Hand back the tail of a batch as a rejected batch of its own; returns its number."""
        spare = self.next_batch
        for e in tail:
            e.batch = spare
        self.batch_state[spare] = REJECTED
        self.rejected_at[spare] = n_labels
        self.proposed_at[spare] = n_labels
        self.split_from[spare] = batch
        return spare

    def _looks_right(self, entries: list[Entry]) -> bool:
        """The batch's own audits put its error rate within what the target allows per item: at
        most 1 - target disagreements among them, plus people's own error rate (audits pending a
        second opinion count as disagreements). Early on a dataset target leaves room for wrong
        labels whatever the audits say (the certificate would hold even if all were wrong); that
        room is not to be spent on a batch its audits refute, nor on a model that will label the
        same items better later. Refusing a batch never weakens the certificate
        (certification.py); audits lean to likelier errors, so this errs to refusing."""
        audits = [e for e in entries if e.audited]
        if not audits:
            return True
        disagreed = sum(1 for e in audits if e.disagreed or e.disagreed is None)
        return disagreed <= (1.0 - self.assumptions.target + self.assumptions.human_error) * len(audits)

    def has_pending(self) -> bool:
        return PENDING in self.batch_state.values()

    def pending_items(self) -> int:
        return sum(1 for e in self.entries if self.batch_state[e.batch] == PENDING and not e.audited)

    # -- planning -------------------------------------------------------------------------------

    def disagreement_rate(self) -> float:
        """Share of audits that disagreed, with a prior of one disagreement in 100 (for planning)."""
        n, d = self.audits()
        return (d + 0.5) / (n + 50.0)

    def plan(
        self,
        confidence: np.ndarray,
        tally: Tally,
        floor: float,
        max_items: int,
        disagreement: np.ndarray | None = None,
    ) -> Plan | None:
        """The largest prefix of the candidates (most confident first), up to max_items, whose
        acceptance the certificate is expected to allow once its audits are in (failing that, the
        smallest larger one that would); None when there is none.

        confidence: the model's probability of its own label per candidate. disagreement: an
        estimate of each candidate's chance to disagree with people (e.g. from out-of-fold
        predictions); without one, one minus the confidence. Either is floored by PLANNING_FLOOR
        times the audited disagreement rate (the model's probabilities saturate), and only
        candidates within the allocation the target allows (allocation_cap) are proposed: the room
        a dataset target leaves is not spent on items a final allocation would leave to people.
        """
        conf = np.asarray(confidence, dtype=np.float64)
        if conf.size == 0 or max_items < min(MIN_BATCH, conf.size):
            return None
        ranked = np.argsort(-conf, kind="stable")
        raw = 1.0 - conf if disagreement is None else np.asarray(disagreement, dtype=np.float64)
        q_all = np.clip(np.maximum(raw[ranked], PLANNING_FLOOR * self.disagreement_rate()), 0.0, 1.0)
        rising = np.maximum.accumulate(q_all)
        order = ranked[rising <= self.allocation_cap(rising, tally)]
        if order.size < min(MIN_BATCH, conf.size):
            return None
        ledger = self.ledger()
        smallest = min(MIN_BATCH, order.size)
        sizes = np.unique(np.geomspace(smallest, order.size, _PLAN_STEPS).astype(int))
        # The largest batch within max_items that fits; failing that, the smallest larger one: a
        # target above what people's own labels reach (0.98 with people at 2%) is met only once
        # enough better-than-human automatic labels offset them, never by a small first batch.
        within = sizes[sizes <= max_items][::-1]
        beyond = sizes[sizes > max_items]
        pending = self.pending_items()
        for m in (*within.tolist(), *beyond.tolist()):
            plan = self._plan_of(order[:m], q_all[:m], ledger, tally, floor, pending)
            if plan is not None:
                return plan
        return None

    def _plan_of(
        self, rows: np.ndarray, q: np.ndarray, ledger: Ledger, tally: Tally, floor: float, pending: int
    ) -> Plan | None:
        m = rows.size
        pi = audit_probability(q, max(floor, min(MIN_BATCH_AUDITS / m, 1.0)))
        unaudited = float((1.0 - pi).sum())
        if unaudited <= 0.0:
            return None  # every item audited: nothing could be accepted, only people diverted
        auto = tally.auto + pending + unaudited
        human = max(tally.human - pending - unaudited, 0.0)
        bound = self._planned_lower(ledger, pi, q, tally, auto, human)
        return Plan(rows, pi, bound) if bound >= self.assumptions.target else None

    def allocation_cap(self, q_sorted: np.ndarray, tally: Tally) -> float:
        """The largest estimated disagreement a candidate may have to be proposed: that of the
        last item of the allocation the target allows in expectation, never below what the target
        allows per item (1 - target, plus people's own error rate), nor above ALLOCATION_STRETCH
        times that.

        q_sorted: every candidate's estimate, ascending (most confident first). The allocation takes
        candidates in that order while the expected wrong labels (those the model is expected to
        have given in batches accepted or pending, at the audited disagreement rate; the
        candidates' own estimates; people's errors on every other item) stay within the target.
        A dataset target is met by the whole pool, so an item the model labels at 86% can go to
        the dataset beside thousands at 99%; but the room is spent once: the candidates it is
        spent on are the ones a final allocation would pick, not whichever batch comes first.
        The certificate alone decides what is accepted; this decides only what is worth auditing.
        """
        a = self.assumptions
        human_error = human_error_estimate(tally.checks, a)
        per_item = 1.0 - a.target + human_error
        if q_sorted.size == 0:
            return per_item
        decided = tally.auto + self.pending_items()
        spent = self.disagreement_rate() * decided
        if a.guarantee == Guarantee.DATASET:
            spent += tally.model  # unchecked model labels count as wrong
        taken = np.arange(1, q_sorted.size + 1, dtype=np.float64)
        errors = spent + np.cumsum(q_sorted)
        if a.guarantee == Guarantee.DATASET:
            undecided = max(tally.items - decided, 0)
            fits = errors + human_error * np.maximum(undecided - taken, 0.0) <= (1.0 - a.target) * tally.items
        else:
            fits = errors <= (1.0 - a.target) * (decided + taken)
        m = int(np.flatnonzero(fits)[-1]) + 1 if fits.any() else 0
        return float(min(max(per_item, q_sorted[m - 1]), ALLOCATION_STRETCH * per_item)) if m else per_item

    def _planned_lower(
        self, ledger: Ledger, pi: np.ndarray, q: np.ndarray, tally: Tally, auto: float, human: float
    ) -> float:
        a = self.assumptions
        upper = planned_upper(ledger, pi, q, a.deltas()[0])
        errors, human_errors = error_bounds(upper, auto, human, a, tally.checks, slack_ahead=False)
        return lower_bound(a.guarantee, errors, human_errors, tally.items, auto, tally.model)
