"""The scorer's per-project model: pure domain code over the policy package, no I/O.

The scorer service (handlers.py) and the offline harness (loadtests/al_offline.py) drive this class
the same way: labels in, refit, rescore the waiting items (people's order, proposals, acceptances),
certificate out.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np

from services.common.projects import ProjectSpec
from services.scorer.policy.budget import HumanBudget
from services.scorer.policy.certification import (
    Assumptions,
    Certificate,
    Guarantee,
    Tally,
    human_error_estimate,
    human_errors_upper,
)
from services.scorer.policy.human_checks import HumanCheckBook
from services.scorer.policy.labels_audit import label_issues
from services.scorer.policy.model import LRClassifier, LRPolicyConfig
from services.scorer.policy.proposals import (
    ACCEPTED,
    REJECTED,
    Entry,
    ProposalBook,
    audit_floor,
    unit_draw,
)
from services.scorer.policy.routing import HANDED_BACK_PRIORITY, confidence_of, route

# Confident learning needs a model worth trusting: enough labels, and a clear contradiction.
LABEL_AUDIT_MIN_LABELS = 30
LABEL_AUDIT_MIN_CONFIDENCE = 0.9
# A proposal is at most this many times the items accepted so far, and at least MIN_PROPOSAL: one
# the audits refute goes back to people, so early ones stay small.
PROPOSAL_GROWTH = 1.0
MIN_PROPOSAL = 50
# The audit probability of a proposed item in a slice a quality report flagged (at least).
FLAGGED_SLICE_AUDIT = 0.5

__all__ = ["ProjectModel", "Rescored", "Suspect", "unit_draw"]


class Suspect(NamedTuple):
    """A human label the model contradicts: the label the model gives instead, and how sure it is."""

    item_id: str
    label: int
    confidence: float


@dataclass
class Rescored:
    """What a refit changes for items still waiting for people. Rows index the waiting items."""

    reprioritize: list[tuple[int, float]] = field(default_factory=list)  # (row, new priority)
    # Newly proposed items: the audited ones go to people now, the others wait for the certificate.
    batch: int = 0
    proposed: list[Entry] = field(default_factory=list)
    # Items to accept now (from this or earlier proposals): (item id, label, confidence).
    accept: list[tuple[str, int, float]] = field(default_factory=list)
    rejected_batches: list[int] = field(default_factory=list)
    # Rejected batches split off an accepted one: (new batch, the batch, its item ids).
    splits: list[tuple[int, int, list[str]]] = field(default_factory=list)
    # Items of those batches still waiting: people get them next (their batch's audits refuted
    # the model there, and until they are labeled the refuted batch weighs on the certificate).
    handed_back: list[str] = field(default_factory=list)


def head_of_queue(rows: np.ndarray, new: np.ndarray, old: np.ndarray, limit: int) -> np.ndarray:
    """Of the moved `rows`, the `limit` that matter to people now: half with the highest new
    priority (entering the head of the queue) and half with the highest old one (leaving it).
    People are served from the head, so a re-rank further down changes nothing they see; the rest
    are re-ranked at a later refit, once they near it. Keeps a refit's writes and messages bounded."""
    half = max(limit // 2, 1)
    entering = rows[np.argsort(-new[rows], kind="stable")[:half]]
    leaving = rows[np.argsort(-old[rows], kind="stable")[:half]]
    return np.union1d(entering, leaving)


class ProjectModel:
    """The project's classifier (class centroids for the first labels, then a logistic regression on
    [embedding, log zero-shot]), refit on the human labels, and the book of proposals whose
    certificate decides what is accepted automatically.

    Rows are feature rows (policy.model.features): the item embedding followed by the labeler's log
    zero-shot probabilities.
    """

    def __init__(
        self,
        project: ProjectSpec,
        label_embeddings: np.ndarray,
        base: LRPolicyConfig,
        *,
        second_opinions: bool = True,
    ) -> None:
        self.project = project
        # Whether human labels the model contradicts are looked for (label_issues): refits then
        # make the out-of-fold predictions that rests on, when due.
        self.second_opinions = second_opinions
        self._checked_labels = 0  # fitted labels at the last quiet-time check (check_labels)
        self.config = replace(base, target_accuracy=project.target_accuracy or base.target_accuracy)
        self.label_embeddings = np.asarray(label_embeddings, dtype=np.float32)
        self.classifier = LRClassifier(self.label_embeddings, self.config)
        k, d = self.label_embeddings.shape
        self.n_features = d + k
        self.assumptions = Assumptions(
            guarantee=Guarantee(project.guarantee or "dataset"),
            target=self.config.target_accuracy,
            delta=project.delta or 0.05,
            human_error=project.human_error,
            n_classes=k,
            blind=project.hide_suggestions,
        )
        self.book = ProposalBook(self.assumptions)
        self.human_checks = HumanCheckBook(project.hide_suggestions)
        self.budget = HumanBudget(project.human_budget_items, project.human_budget_share)
        # Grown by doubling: labels arrive one by one, and copying the whole matrix per label
        # would make a long project quadratic.
        self._X = np.zeros((64, self.n_features), dtype=np.float32)
        self._y = np.zeros(64, dtype=np.int64)
        # Training weight per label: 1, or an aggregated label's posterior (several people).
        self._w = np.ones(64, dtype=np.float64)
        self._n = 0
        self.item_ids: list[str] = []
        self._rows: dict[str, int] = {}
        self.second_opinion_asked: set[str] = set()
        self.refits = 0
        self.pending_labels = 0
        self.seen = 0  # items of the project the scorer has decided
        self.auto = 0  # accepted automatically
        self.model_labeled = 0  # finalized with the model's label when the budget ran out

    @property
    def version(self) -> str:
        kind = "lr" if self.classifier.uses_lr else "centroid"
        return f"{kind}-r{self.refits}-n{self.classifier.n_fitted}"

    @property
    def X(self) -> np.ndarray:
        return self._X[: self._n]

    @property
    def y(self) -> np.ndarray:
        return self._y[: self._n]

    @property
    def n_labels(self) -> int:
        return self._n

    def add_labels(
        self,
        X: np.ndarray,
        y: np.ndarray,
        item_ids: list[str],
        weights: np.ndarray | None = None,
        *,
        check: bool = True,
        blind: list[bool] | None = None,
    ) -> list[tuple[str, int]]:
        """Append human labels in arrival order. A label on a proposed item is also its audit
        outcome (or, for an item handed back to people, its disagreement become known). In a
        project whose people label blind, every one person's label is checked against the model's
        label (the proposed one, else the model's own before it learns this label) where the
        person saw no suggestion (`blind` per label, as the review service served it; all of them
        when not given). `check=False` only trains (a restart replays the checks: restore_check).

        Returns the items whose label disagrees with the model where that calls for a second person
        (a proposed item, or any checked label): (item id, the model's label); see
        record_second_opinion."""
        if len(y) == 0:
            return []
        checked = check and self.human_checks.blind
        before = self.predict_proba(X).argmax(axis=1).tolist() if checked else [None] * len(y)
        end = self._n + len(y)
        if end > len(self._y):
            capacity = max(end, 2 * len(self._y))
            self._X = np.vstack(
                [self._X[: self._n], np.zeros((capacity - self._n, self._X.shape[1]), np.float32)]
            )
            self._y = np.concatenate([self._y[: self._n], np.zeros(capacity - self._n, np.int64)])
            self._w = np.concatenate([self._w[: self._n], np.ones(capacity - self._n, np.float64)])
        self._X[self._n : end] = np.asarray(X, dtype=np.float32)
        self._y[self._n : end] = np.asarray(y, dtype=np.int64)
        self._w[self._n : end] = 1.0 if weights is None else np.asarray(weights, dtype=np.float64)
        self._n = end
        adjudicate = []
        # One person's label, given blind: anything else counts at the assumed rate.
        checkable = (self._w[end - len(y) : end] == 1.0) & (
            True if blind is None else np.asarray(blind, bool)
        )
        for item_id, label, model_label, one in zip(
            item_ids, np.asarray(y).tolist(), before, checkable.tolist(), strict=True
        ):
            self._rows[item_id] = len(self.item_ids)
            self.item_ids.append(item_id)
            entry = self.book.latest(item_id)
            if entry is not None:
                model_label = entry.label  # fixed when it was proposed
            asks = self.book.record_label(item_id, int(label))
            if check and self.human_checks.record(item_id, int(label), model_label, one):
                asks = True
            if asks:
                assert model_label is not None  # asked by the book (proposed) or by a check
                adjudicate.append((item_id, int(model_label)))
        self.pending_labels += len(y)
        return adjudicate

    def restore_check(
        self,
        item_id: str,
        first: int,
        model_label: int | None,
        checkable: bool,
        second: int | None,
        final: int,
    ) -> bool:
        """Replay a stored label's check after a restart (the labels went in with check=False).
        Returns True when it waits for a second person nobody was asked for yet."""
        asks = self.human_checks.record(item_id, first, model_label, checkable)
        if second is not None:
            self.human_checks.record_second(item_id, second)
            if final != first:
                self.human_checks.replaced(item_id)
        return asks and second is None

    def record_second_opinion(self, item_id: str, label: int) -> None:
        """A second person's label: settles a disagreeing audit; when it sides with the model the
        first label is corrected (two of three votes)."""
        self.book.record_second_opinion(item_id, label)
        self.human_checks.record_second(item_id, label)

    def relabel(self, item_id: str, label: int) -> None:
        """A second opinion corrected a human label: train on the corrected one."""
        self.human_checks.replaced(item_id)
        row = self._rows.get(item_id)
        if row is not None:
            self._y[row] = label
            self.pending_labels += 1

    def label_issues(self, limit: int) -> list[Suspect]:
        """Human labels the out-of-fold model contradicts with confidence and nobody re-checked yet,
        at most `limit`."""
        n = self.classifier.oof_labels
        if n < LABEL_AUDIT_MIN_LABELS or limit <= 0:
            return []
        oof = self.classifier.oof_proba()
        out = []
        # The rows the last out-of-fold predictions saw (later labels are checked once the labels
        # have grown enough for the next ones, LRPolicyConfig.oof_refresh_growth).
        for row in label_issues(oof, self.y[:n], LABEL_AUDIT_MIN_CONFIDENCE):
            item_id = self.item_ids[row]
            if item_id not in self.second_opinion_asked:
                best = int(oof[row].argmax())
                out.append(Suspect(item_id, best, float(oof[row, best])))
            if len(out) >= limit:
                break
        return out

    def refit(self) -> None:
        """Refit on every human label.

        Safe to run in a worker thread while the event loop adds labels: it fits on the rows
        present when it starts (appends never touch them; a relabel is copied out), and labels
        that arrive meanwhile stay pending for the next refit. The out-of-fold predictions
        label_issues reads are made here too, when due, so the event loop never waits for them.
        """
        n, pending = self._n, self.pending_labels
        if pending == 0 and self.refits > 0:
            return
        self.classifier.fit(self._X[:n], self._y[:n].copy(), weight=self._w[:n].copy())
        if self.second_opinions and n >= LABEL_AUDIT_MIN_LABELS and self.classifier.oof_due():
            self.classifier.refresh_oof()
        self.refits += 1
        self.pending_labels -= pending

    def labels_unchecked(self) -> bool:
        """True when the last out-of-fold predictions missed some fitted labels: refits make them
        again only as the labels grow by a tenth, so the last labels of a burst wait for a quiet
        moment (check_labels)."""
        n = self.classifier.n_fitted
        checked = max(self.classifier.oof_labels, self._checked_labels)
        return self.second_opinions and n >= LABEL_AUDIT_MIN_LABELS and checked < n

    def check_labels(self) -> None:
        """Out-of-fold predictions over every fitted label, for label_issues. Safe in a worker
        thread for the same reason as refit (only the refit loop calls either, one at a time)."""
        # Noted first: a check that fails is not tried again until more labels are fitted.
        self._checked_labels = self.classifier.n_fitted
        self.classifier.refresh_oof()

    # -- where the project stands ---------------------------------------------------------------

    def tally(self, *, undecided_as_human: bool = True) -> Tally:
        """Counts the certificate rests on. Items nobody decided yet count as future human labels
        (they are, unless the budget runs out: then they count as unchecked model labels)."""
        undecided = max(self.seen - self.auto - self.n_labels - self.model_labeled, 0)
        checks = self.human_checks.counts()
        if undecided_as_human:
            return Tally(self.seen, self.auto, self.n_labels + undecided, self.model_labeled, checks)
        return Tally(self.seen, self.auto, self.n_labels, self.model_labeled + undecided, checks)

    def certificate(self) -> Certificate:
        return self.book.certificate(self.tally())

    def estimated_accuracy(self) -> float:
        """Point estimate of what the certificate bounds: disagreements seen by audits, weighted by
        the inverse of their audit probability, over the automatic labels (dataset: plus people's
        assumed errors and the unchecked model labels)."""
        t = self.tally()
        ledger = self.book.ledger()
        done = ledger.audited & np.array([e.disagreed is not None for e in self.book.entries], dtype=bool)
        pi = ledger.audit_prob[done]
        weighted = float((ledger.disagreed[done] * (1.0 - pi) / pi).sum()) if done.any() else 0.0
        auto_rate = min(weighted / max(len(ledger.audit_prob) - int(ledger.audited.sum()), 1), 1.0)
        if self.assumptions.guarantee is Guarantee.AUTOMATIC:
            return 1.0 - auto_rate
        wrong = auto_rate * t.auto + human_error_estimate(t.checks, self.assumptions) * t.human + t.model
        return 1.0 - wrong / t.items if t.items else 1.0

    def budget_spent(self, extra_seen: int = 0) -> bool:
        """True when people have labeled as many items as the project's human budget allows."""
        return self.budget.spent(self.n_labels, self.seen + extra_seen)

    def is_control(self, item_id: str) -> bool:
        return self.project.control_rate > 0 and unit_draw(item_id, "control") < self.project.control_rate

    def finalize(self, X: np.ndarray) -> list[tuple[int, float]]:
        """The model's label and confidence for each row, whatever the certificate."""
        if len(X) == 0:
            return []
        probs = self.predict_proba(X)
        return list(zip(probs.argmax(axis=1).tolist(), confidence_of(probs).tolist(), strict=True))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.classifier.predict_proba(np.asarray(X, dtype=np.float64))

    @property
    def ranks_by_ambiguity(self) -> bool:
        """After the random warm-up, people get the items the model is least sure about first."""
        return self.n_labels >= self.config.min_human_labels

    # -- decisions ------------------------------------------------------------------------------

    def decide(self, X: np.ndarray, item_ids: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """New items all wait for people (acceptance goes through proposals at the next refit):
        (label, confidence, priority) per row."""
        draws = np.array([unit_draw(i, "order") for i in item_ids], dtype=np.float64)
        r = route(self.predict_proba(X), draws, self.n_labels, self.config.min_human_labels)
        return r.label, r.confidence, r.priority

    def rescore(
        self,
        X: np.ndarray,
        item_ids: list[str],
        priorities: np.ndarray | None = None,
        flagged: np.ndarray | None = None,
        draws: np.ndarray | None = None,
        rerank_limit: int | None = None,
        probs: np.ndarray | None = None,
    ) -> Rescored:
        """Items waiting for people after a refit: re-rank them, settle the pending proposals and
        propose the next batch among the items never proposed.

        `priorities` are the waiting items' current priorities (unchanged ones are not re-sent).
        `flagged` marks items of slices a quality report flagged: audited at least
        FLAGGED_SLICE_AUDIT when proposed. `draws` are the items' fixed order draws, when the caller
        keeps them (unit_draw(item_id, "order")). `rerank_limit` bounds the re-ranks sent (see
        head_of_queue). `probs`: the model's distributions of X, when the caller made them already
        (predict_proba, e.g. in a worker thread)."""
        out = Rescored()
        if not self.ranks_by_ambiguity:
            return out
        if probs is None:
            probs = self.predict_proba(X) if len(X) else np.zeros((0, len(self.label_embeddings)))
        if draws is None:
            draws = np.array([unit_draw(i, "order") for i in item_ids], dtype=np.float64)
        routing = route(probs, draws, self.n_labels, self.config.min_human_labels)
        fresh = np.fromiter(
            (self.book.proposable(i, self.n_labels) for i in item_ids), dtype=bool, count=len(item_ids)
        )
        prio = routing.priority.astype(np.float64)
        if self.book.index:
            # Handed back: stays ahead of the ambiguity order until people label it.
            handed_back = np.fromiter(
                (i in self.book.index for i in item_ids), dtype=bool, count=len(item_ids)
            )
            prio[handed_back] = HANDED_BACK_PRIORITY
        moved = fresh if priorities is None else fresh & (np.abs(prio - np.asarray(priorities)) > 0.01)
        rows = np.flatnonzero(moved)
        if rerank_limit is not None and len(rows) > rerank_limit and priorities is not None:
            rows = head_of_queue(rows, prio, np.asarray(priorities, dtype=np.float64), rerank_limit)
        out.reprioritize = list(zip(rows.tolist(), prio[rows].tolist(), strict=True))
        self._propose(out, item_ids, routing.label, routing.confidence, fresh, flagged)
        # A proposed item's priority is its audit's (or it waits for its batch): a re-rank of it
        # in the same message would race the audit's in review.
        proposed = {e.item_id for e in out.proposed}
        out.reprioritize = [(row, p) for row, p in out.reprioritize if item_ids[row] not in proposed]
        self._settle(out)
        return out

    def settle(self) -> Rescored:
        """Accept what the certificate allows without proposing more (the budget is spent: what
        nobody decided will get unchecked model labels, and counts as such)."""
        out = Rescored()
        self._settle(out, self.tally(undecided_as_human=False))
        return out

    def _propose(
        self,
        out: Rescored,
        item_ids: list[str],
        labels: np.ndarray,
        conf: np.ndarray,
        fresh: np.ndarray,
        flagged: np.ndarray | None = None,
    ) -> None:
        candidates = np.flatnonzero(fresh)
        # One proposal at a time: a pending audit counts as a disagreement, so a batch waiting for
        # its audits would weigh on the verdict of any other.
        if candidates.size == 0 or self.book.has_pending():
            return
        room = max(MIN_PROPOSAL, int(PROPOSAL_GROWTH * self.auto))
        floor = audit_floor(
            self.project.audit_rate,
            self.assumptions.target,
            self.seen,
            self._people_error_share(),
            self.book.disagreement_rate(),
        )
        plan = self.book.plan(conf[candidates], self.tally(), floor, room)
        if plan is None:
            return
        out.batch = self.book.next_batch
        self.book.proposed_at[out.batch] = self.n_labels
        for rank, planned in zip(plan.rows.tolist(), plan.audit_prob.tolist(), strict=True):
            row = int(candidates[rank])
            item_id = item_ids[row]
            # More audits where a report found the labels worse than on average: the certificate
            # stays valid (pi is still fixed before the draw) and the slice's accuracy is measured
            # on more of its items.
            pi = max(planned, FLAGGED_SLICE_AUDIT) if flagged is not None and flagged[row] else planned
            # The draw is fixed by the item id and only now compared with pi, which was set first.
            # A handed-back item proposed again gets a fresh one: its first draw is known to have
            # been at least the first pi, so reusing it would audit less often than pi says.
            salt = "audit" if item_id not in self.book.index else f"audit:{out.batch}"
            audited = unit_draw(item_id, salt) < pi
            entry = Entry(
                item_id, out.batch, int(labels[row]), float(pi), audited, confidence=float(conf[row])
            )
            self.book.add(entry)
            out.proposed.append(entry)

    def _people_error_share(self) -> float:
        """People's wrong labels as a share of the pool, for sizing the audits: all of it at the
        assumed rate h; in a blind project, the bound on the labels given so far (their checks
        show how few are wrong; a proposal accepted leaves few more to come)."""
        if not self.assumptions.blind:
            return self.assumptions.human_error
        checks = self.human_checks.counts()
        wrong = human_errors_upper(checks.given, checks, self.assumptions)
        return min(self.assumptions.human_error, wrong / max(self.seen, 1))

    def _settle(self, out: Rescored, tally: Tally | None = None) -> None:
        accepted, rejected = self.book.settle(tally or self.tally(), self.n_labels)
        for batch in accepted:
            for e in self.book.batch(batch):
                if not e.audited and e.disagreed is None:
                    out.accept.append((e.item_id, e.label, e.confidence))
        # Final from here on: an item labeled by people in the meantime stays theirs (the scorer's
        # acceptance of it finds no waiting item), a rare race counted here as automatic.
        self.auto += len(out.accept)
        out.rejected_batches.extend(rejected)
        for batch in rejected:
            if batch in self.book.split_from:
                ids = [e.item_id for e in self.book.batch(batch)]
                out.splits.append((batch, self.book.split_from[batch], ids))
            out.handed_back += [
                e.item_id for e in self.book.batch(batch) if not e.audited and e.disagreed is None
            ]

    def restore_proposal(self, entry: Entry, state: str) -> None:
        """Rebuild the book from PostgreSQL after a restart, in batch order (human labels are added
        after it)."""
        self.book.add(entry, state if state in (ACCEPTED, REJECTED) else "pending")
        self.book.proposed_at.setdefault(entry.batch, self.n_labels)
        if state == REJECTED:
            self.book.rejected_at.setdefault(entry.batch, self.n_labels)
