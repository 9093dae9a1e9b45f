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
    Assumptions,
    Certificate,
    Ledger,
    Tally,
    binomial_upper,
    certify,
    error_bounds,
    lower_bound,
    planned_upper,
)

PENDING, ACCEPTED, REJECTED = "pending", "accepted", "rejected"
# Sizes tried when planning a proposal, as shares of the candidates (largest that fits wins).
_PLAN_STEPS = 24


def unit_draw(item_id: str, salt: str = "audit") -> float:
    """A uniform draw in [0, 1) fixed by the item id, so a redelivered item gets the same decision.
    The policy never looks at it before fixing the item's audit probability."""
    digest = hashlib.sha256(f"{salt}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def audit_floor(configured: float, target: float, expected_items: int) -> float:
    """The smallest audit probability: the project's audit rate when set, else sized to the pool.

    No bound can rule out errors that were never audited: with audit probability pi the smallest
    certifiable count of unseen errors is about log(1/delta) / pi whatever the audits show. So pi is
    sized to the errors the target leaves room for (about 12 / ((1 - target) n)): a fixed number of
    audits, a shrinking share of a growing pool.
    """
    if configured > 0:
        return float(min(configured, 1.0))
    room = max((1.0 - target) * max(expected_items, 1), 1.0)
    return float(np.clip(12.0 / room, 0.01, 0.3))


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

    # -- bookkeeping ----------------------------------------------------------------------------

    @property
    def next_batch(self) -> int:
        return max(self.batch_state, default=0) + 1

    def add(self, entry: Entry, state: str = PENDING) -> None:
        if entry.item_id in self.index:
            return
        self.index[entry.item_id] = len(self.entries)
        self.entries.append(entry)
        self.batch_state.setdefault(entry.batch, state)

    def proposed(self, item_id: str) -> bool:
        return item_id in self.index

    def record_label(self, item_id: str, label: int) -> bool:
        """A human label arrived for an item. Returns True when it is an audit that disagrees with
        the model: the caller asks a second person (record_second_opinion settles it)."""
        row = self.index.get(item_id)
        if row is None:
            return False
        entry = self.entries[row]
        if entry.disagreed is not None or entry.adjudicating:
            return False
        if entry.audited and label != entry.label:
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

    def ledger(self) -> Ledger:
        if not self.entries:
            return Ledger.empty()
        return Ledger(
            np.array([e.audit_prob for e in self.entries], dtype=np.float64),
            np.array([e.audited for e in self.entries], dtype=bool),
            # A pending audit counts as a disagreement until its label arrives.
            np.array([1.0 if e.disagreed is None else float(e.disagreed) for e in self.entries]),
        )

    def _rejected_disagreements(self) -> float:
        """Disagreements known among proposed items that were not audited and not accepted (people
        labeled them after their batch was handed back), less an upper bound on those that are
        people's own errors: the CS counts adjudicated disagreements, these have one label only."""
        labeled = [
            bool(e.disagreed)
            for e in self.entries
            if not e.audited and e.disagreed is not None and self.batch_state[e.batch] != ACCEPTED
        ]
        if not labeled:
            return 0.0
        a = self.assumptions
        own = binomial_upper(len(labeled), a.human_error, a.deltas()[3]) if a.human_error > 0 else 0.0
        return max(sum(labeled) - own, 0.0)

    def audits(self) -> tuple[int, int]:
        """(audit labels in, of which disagreed)."""
        done = [e.disagreed for e in self.entries if e.audited and e.disagreed is not None]
        return len(done), sum(done)

    # -- the certificate ------------------------------------------------------------------------

    def certificate(self, tally: Tally) -> Certificate:
        tally = replace(tally, rejected_disagreements=self._rejected_disagreements())
        return certify(self.ledger(), tally, self.assumptions)

    def settle(self, tally: Tally) -> tuple[list[int], list[int]]:
        """Accept every pending batch (oldest first) the certificate allows; hand back to people
        those whose audits are all in and still do not fit. Returns (accepted, rejected) batches.

        `tally.human` counts every item not decided yet as a future human label, so a batch is
        accepted only if the dataset would still meet the target when people label the rest."""
        accepted: list[int] = []
        rejected: list[int] = []
        auto = tally.auto
        for batch in sorted(b for b, s in self.batch_state.items() if s == PENDING):
            entries = self.batch(batch)
            unaudited = sum(1 for e in entries if not e.audited)
            trial = Tally(tally.items, auto + unaudited, max(tally.human - unaudited, 0), tally.model)
            if self.certificate(trial).met:
                self.batch_state[batch] = ACCEPTED
                accepted.append(batch)
                auto += unaudited
            elif all(e.disagreed is not None for e in entries if e.audited):
                self.batch_state[batch] = REJECTED
                rejected.append(batch)
        return accepted, rejected

    def pending_items(self) -> int:
        return sum(1 for e in self.entries if self.batch_state[e.batch] == PENDING and not e.audited)

    # -- planning -------------------------------------------------------------------------------

    def disagreement_rate(self) -> float:
        """Share of audits that disagreed, with a prior of one disagreement in 100 (for planning)."""
        n, d = self.audits()
        return (d + 0.5) / (n + 50.0)

    def plan(self, confidence: np.ndarray, tally: Tally, floor: float, max_items: int) -> Plan | None:
        """The largest prefix of the candidates (most confident first) whose acceptance the
        certificate is expected to allow once its audits are in; None when not even a small one.

        confidence: the model's probability of its own label per candidate. The expected
        disagreement of an item is that error (floored by half the audited disagreement rate, since
        the model's probabilities saturate).
        """
        conf = np.asarray(confidence, dtype=np.float64)
        if conf.size == 0 or max_items <= 0:
            return None
        order = np.argsort(-conf, kind="stable")[:max_items]
        q = np.clip(np.maximum(1.0 - conf[order], 0.5 * self.disagreement_rate()), 0.0, 1.0)
        pi = audit_probability(q, floor)
        ledger = self.ledger()
        pending = self.pending_items()
        best: Plan | None = None
        sizes = np.unique(np.geomspace(1, order.size, _PLAN_STEPS).astype(int))
        for m in sizes[::-1]:
            unaudited = float((1.0 - pi[:m]).sum())
            auto = tally.auto + pending + unaudited
            human = max(tally.human - pending - unaudited, 0.0)
            bound = self._planned_lower(ledger, pi[:m], q[:m], tally, auto, human)
            if bound >= self.assumptions.target:
                best = Plan(order[:m], pi[:m], bound)
                break
        return best

    def _planned_lower(
        self, ledger: Ledger, pi: np.ndarray, q: np.ndarray, tally: Tally, auto: float, human: float
    ) -> float:
        a = self.assumptions
        upper = planned_upper(ledger, pi, q, a.deltas()[0]) - self._rejected_disagreements()
        errors, human_errors = error_bounds(upper, auto, human, a)
        return lower_bound(a.guarantee, errors, human_errors, tally.items, auto, tally.model)
