"""The scorer's per-project model: pure domain code over the policy, no I/O."""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np

from services.common.projects import ProjectSpec
from services.scorer.policy import (
    Decision,
    agreement_target,
    confidence_of,
    label_issues,
    wilson_lower_bound,
)
from services.scorer.policy_lr import LRClassifier, LRPolicyConfig, calibrate, route, threshold_in_force

# Audits of auto-accepted labels are the one unbiased check of the threshold. When the recent
# ones show the target is missed (upper bound below it), every auto-acceptable item is audited
# until fresh audits under refit models show the target is met again.
AUDIT_WINDOW = 50
AUDIT_MIN = 20
# Confident learning needs a model worth trusting: enough labels, and a clear contradiction.
LABEL_AUDIT_MIN_LABELS = 30
LABEL_AUDIT_MIN_CONFIDENCE = 0.9


# Reasons an item goes to people by a random draw rather than for its ambiguity (plus "warmup" for
# the first min_human_labels labels, drawn at random before any model ranks the queue).
RANDOM_REASONS = frozenset({"sample", "audit", "control"})


def held_reason(threshold: float | None) -> str:
    """Why the draw sends an item to people: a random "sample" of every item while no threshold
    exists, an "audit" of an auto-acceptable one after. Also the salt of that draw (see _draws)."""
    return "audit" if threshold is not None else "sample"


def unit_draw(item_id: str, salt: str = "audit") -> float:
    """A uniform draw in [0, 1) fixed by the item id, so a redelivered item gets the same decision."""
    digest = hashlib.sha256(f"{salt}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclass
class Rescored:
    """What a refit changes for items still waiting for people."""

    accept: list[tuple[int, int, float]] = field(default_factory=list)  # (row, label, confidence)
    reprioritize: list[tuple[int, float]] = field(default_factory=list)  # (row, new priority)
    # Items drawn for people whatever the model thinks: (row, label, confidence, priority, reason),
    # reason "audit" (an auto-acceptable item) or "sample" (drawn before any threshold exists).
    audit: list[tuple[int, int, float, float, str]] = field(default_factory=list)


class ProjectModel:
    """The project's classifier (class centroids for the first labels, then a logistic regression on
    [embedding, log zero-shot]), refit on the human labels, with an auto-accept threshold calibrated on
    its out-of-fold predictions.

    Rows are feature rows (policy_lr.features): the item embedding followed by the labeler's log
    zero-shot probabilities.
    """

    def __init__(self, project: ProjectSpec, label_embeddings: np.ndarray, base: LRPolicyConfig) -> None:
        self.project = project
        self.config = replace(
            base,
            target_accuracy=project.target_accuracy or base.target_accuracy,
            audit_rate=project.audit_rate if project.audit_rate > 0 else base.audit_rate,
        )
        self.label_embeddings = np.asarray(label_embeddings, dtype=np.float32)
        self.classifier = LRClassifier(self.label_embeddings, self.config)
        k, d = self.label_embeddings.shape
        self.n_features = d + k
        # Grown by doubling: labels arrive one by one, and copying the whole matrix per label
        # would make a long project quadratic.
        self._X = np.zeros((64, self.n_features), dtype=np.float32)
        self._y = np.zeros(64, dtype=np.int64)
        self._random = np.zeros(64, dtype=bool)
        self._n = 0
        self.item_ids: list[str] = []
        self._rows: dict[str, int] = {}
        self.second_opinion_asked: set[str] = set()
        self.threshold: float | None = None
        # Threshold estimates of the last refits, newest last (see refit).
        self._estimates: deque[float | None] = deque(maxlen=self.config.confirmations)
        self.estimated_accuracy = 0.0  # out-of-fold accuracy of the labeled items above the threshold
        self.support = 0  # human-labeled items the estimate above the threshold rests on
        self.random_support = 0  # of which drawn at random
        self.random_accuracy = 0.0  # their out-of-fold accuracy
        self.refits = 0
        self.pending_labels = 0
        self.recent_audits: deque[bool] = deque(maxlen=AUDIT_WINDOW)
        self.audit_alarm = False
        self.seen = 0  # items of the project the scorer has decided

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

    @property
    def random(self) -> np.ndarray:
        """Per labeled row: whether people got it by a random draw (see is_random)."""
        return self._random[: self._n]

    def is_random(self, row: int, reason: str) -> bool:
        """Whether the row-th human label (in arrival order) came from a random draw: a sample, an
        audit, the control arm, or the warm-up before the queue was ever ranked by ambiguity (a
        "warmup" item labeled later was re-ranked by then, so it does not count)."""
        return reason in RANDOM_REASONS or (reason == "warmup" and row < self.config.min_human_labels)

    def add_labels(self, X: np.ndarray, y: np.ndarray, item_ids: list[str], reasons: list[str]) -> None:
        """Append human labels in arrival order; reasons are the items' routing reasons."""
        if len(y) == 0:
            return
        if len(reasons) != len(y):
            raise ValueError(f"{len(y)} labels but {len(reasons)} reasons")
        end = self._n + len(y)
        if end > len(self._y):
            capacity = max(end, 2 * len(self._y))
            self._X = np.vstack(
                [self._X[: self._n], np.zeros((capacity - self._n, self._X.shape[1]), np.float32)]
            )
            self._y = np.concatenate([self._y[: self._n], np.zeros(capacity - self._n, np.int64)])
            self._random = np.concatenate([self._random[: self._n], np.zeros(capacity - self._n, bool)])
        self._X[self._n : end] = np.asarray(X, dtype=np.float32)
        self._y[self._n : end] = np.asarray(y, dtype=np.int64)
        self._random[self._n : end] = [self.is_random(self._n + i, r) for i, r in enumerate(reasons)]
        self._n = end
        for item_id in item_ids:
            self._rows[item_id] = len(self.item_ids)
            self.item_ids.append(item_id)
        self.pending_labels += len(y)

    def relabel(self, item_id: str, label: int) -> None:
        """A second opinion corrected a human label: train on the corrected one."""
        row = self._rows.get(item_id)
        if row is not None:
            self._y[row] = label
            self.pending_labels += 1

    def label_issues(self, limit: int) -> list[tuple[str, int]]:
        """Human labels the out-of-fold model contradicts with confidence and nobody re-checked yet:
        (item id, the model's label), at most `limit`."""
        n = self.classifier.n_fitted
        if n < LABEL_AUDIT_MIN_LABELS:
            return []
        oof = self.classifier.oof_proba()
        out = []
        # The rows the last refit saw (labels arriving during it are checked after the next one).
        for row in label_issues(oof, self.y[:n], LABEL_AUDIT_MIN_CONFIDENCE):
            item_id = self.item_ids[row]
            if item_id not in self.second_opinion_asked:
                out.append((item_id, int(oof[row].argmax())))
            if len(out) >= limit:
                break
        return out

    def add_audit_results(self, agreed: Iterable[bool]) -> None:
        """Whether people agreed with audited auto-acceptable labels, oldest first."""
        self.recent_audits.extend(agreed)

    def _audits_miss_target(self) -> bool:
        # A copy: the event loop may append audit results while a refit runs in a worker thread.
        recent = tuple(self.recent_audits)
        n = len(recent)
        if n < AUDIT_MIN:
            return False
        agreed = sum(recent)
        upper = 1.0 - wilson_lower_bound(n - agreed, n, self.config.z)
        k = self.label_embeddings.shape[0]
        return upper < agreement_target(self.config.target_accuracy, self.config.annotator_error, k)

    def refit(self) -> None:
        """Refit on every human label and choose the threshold from out-of-fold predictions.

        The threshold in force is the strictest of the last `confirmations` estimates (see
        policy_lr.threshold_in_force).

        Safe to run in a worker thread while the event loop adds labels: it fits on the rows
        present when it starts (appends never touch them; a relabel is copied out), and labels
        that arrive meanwhile stay pending for the next refit.
        """
        n, pending = self._n, self.pending_labels
        X, y, rnd = self._X[:n], self._y[:n].copy(), self._random[:n]
        if n == 0:
            estimate = None
            self.classifier.fit(np.zeros((0, self.n_features)), np.zeros(0, dtype=np.int64))
        else:
            estimate = calibrate(self.classifier, X, y, self.config, random=rnd)
        self._estimates.append(estimate)
        self.threshold = threshold_in_force(self._estimates, self.config.confirmations)
        self.estimated_accuracy = self._accuracy_above_threshold(y, rnd)
        self.audit_alarm = self._audits_miss_target()
        self.refits += 1
        self.pending_labels -= pending

    def _accuracy_above_threshold(self, y: np.ndarray, random: np.ndarray) -> float:
        self.support = self.random_support = 0
        self.random_accuracy = 0.0
        if self.threshold is None or y.size == 0:
            return 0.0
        oof = self.classifier.oof_proba()
        above = confidence_of(oof) >= self.threshold
        self.support = int(above.sum())
        if not above.any():
            return 0.0
        agree = oof.argmax(axis=1) == y
        above_random = above & random
        self.random_support = int(above_random.sum())
        if self.random_support:
            self.random_accuracy = float(agree[above_random].mean())
        return float(agree[above].mean())

    def budget_spent(self, extra_seen: int = 0) -> bool:
        """True when people have labeled as many items as the project's human budget allows."""
        budget = self.project.human_budget(self.seen + extra_seen)
        return budget is not None and self.n_labels >= budget

    def is_control(self, item_id: str) -> bool:
        return self.project.control_rate > 0 and unit_draw(item_id, "control") < self.project.control_rate

    def finalize(self, X: np.ndarray) -> list[tuple[int, float]]:
        """The model's label and confidence for each row, whatever the threshold."""
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

    def _draws(self, item_ids: list[str], threshold: float | None) -> np.ndarray:
        """Per item: the draw that picks the random sample before a threshold exists, and an
        independent one for audits after. A pool is decided before any threshold, so with one
        draw for both every item it would audit would have been sampled already."""
        salt = held_reason(threshold)
        return np.array([unit_draw(i, salt) for i in item_ids], dtype=np.float64)

    def decide(self, X: np.ndarray, item_ids: list[str]) -> list[Decision]:
        alarm = self.audit_alarm and self.threshold is not None
        config = replace(self.config, audit_rate=1.0) if alarm else self.config
        draws = self._draws(item_ids, self.threshold)
        return route(self.predict_proba(X), self.threshold, draws, self.n_labels, config).decisions()

    def rescore(self, X: np.ndarray, item_ids: list[str]) -> Rescored:
        """Items waiting for people: accept those that now clear the threshold, re-rank the rest, and
        hold back the random audit share exactly as `decide` does for new items.

        In a pool every item is decided before the first human label, so without the draw here
        nothing auto-accepted would ever be audited and the threshold would rest on labels picked
        for their ambiguity alone (AG News, 18% budget: 74.4% auto-accepted at 0.9287 for 0.95).
        """
        out = Rescored()
        if len(X) == 0 or not self.ranks_by_ambiguity:
            return out
        # Under an audit alarm nothing is accepted; the random sample keeps being drawn.
        threshold = None if self.audit_alarm else self.threshold
        draws = self._draws(item_ids, threshold)
        routing = route(self.predict_proba(X), threshold, draws, self.n_labels, self.config)
        reason = held_reason(threshold)
        for row, (kind, label, conf, priority) in enumerate(
            zip(
                routing.kind.tolist(),
                routing.label.tolist(),
                routing.confidence.tolist(),
                routing.priority.tolist(),
                strict=True,
            )
        ):
            if kind == 0:
                out.accept.append((row, label, conf))
            elif kind == 2:
                out.audit.append((row, label, conf, priority, reason))
            else:
                out.reprioritize.append((row, priority))
        return out
