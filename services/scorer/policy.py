"""Building blocks of the active-learning policy: class centroids, the Wilson-bound threshold, margins
and confident learning; and the centroid-only policy the offline harnesses compare against.

Pure numpy domain code, no I/O. The scorer's policy (policy_lr.py) uses the centroids for a project's
first labels and the threshold and label-audit functions throughout.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np

_EPS = 1e-12


@dataclass(frozen=True)
class PolicyConfig:
    # Required accuracy of auto-accepted labels.
    target_accuracy: float = 0.95
    # Share of auto-acceptable items still sent to people: an unbiased sample that keeps measuring the
    # accuracy of what is auto-accepted and feeds confident examples back into the threshold estimate.
    audit_rate: float = 0.02
    # No auto-acceptance before this many human labels: below it the leave-one-out estimate is noise.
    min_human_labels: int = 40
    # A threshold is only trusted with at least this many labeled items at or above it.
    min_support: int = 30
    # One-sided z of the Wilson lower bound (1.645 = 95%): the bound, not the point estimate, must reach
    # the target, so small or lucky samples cannot open the gate. The threshold is re-estimated at every
    # refit and acceptances are final, so a looser bound (1.28) let lucky estimates through: auto-accepted
    # accuracy fell below the target on AG News, BANKING77 and CLINC150 (docs/benchmarks.md).
    z: float = 1.645
    # Softmax temperature over cosine similarities.
    temperature: float = 0.05
    # Weight of the label-description embedding in each centroid, in units of labeled examples: it
    # carries zero-shot knowledge early and fades as labels accumulate.
    prior_weight: float = 4.0
    # Assumed rate at which people pick a wrong label. Accuracy is measured against human labels, so their
    # errors look like model errors; the target is translated into the agreement rate it implies (see
    # agreement_target). 0.0 is the conservative setting and the default: crediting 0.02 let auto-accepted
    # accuracy land on the agreement rate instead of the target in the benchmarks.
    annotator_error: float = 0.0
    # Priority given to audit tasks: between confident and ambiguous reviews.
    audit_priority: float = 0.5


def _normalize_rows(m: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    out: np.ndarray = m / np.maximum(norms, _EPS)
    return out


def softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(scores, dtype=np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


class CentroidClassifier:
    """Nearest-centroid classifier on normalized embeddings, seeded by label-description embeddings.

    centroid_c = normalize(prior_weight * desc_c + sum of labeled embeddings of class c).
    """

    def __init__(self, label_embeddings: np.ndarray, config: PolicyConfig) -> None:
        self._desc = _normalize_rows(np.asarray(label_embeddings, dtype=np.float64))
        self._config = config
        self._X = np.zeros((0, self._desc.shape[1]), dtype=np.float64)
        self._y = np.zeros(0, dtype=np.int64)
        # Unnormalized centroid sums; kept so leave-one-out can subtract a row exactly.
        self._sums = config.prior_weight * self._desc
        self._centroids = _normalize_rows(self._sums)

    @property
    def n_classes(self) -> int:
        return int(self._desc.shape[0])

    @property
    def n_fitted(self) -> int:
        return int(self._y.shape[0])

    def fit(self, X: np.ndarray, y: np.ndarray) -> None:
        X64 = np.asarray(X, dtype=np.float64).reshape(-1, self._desc.shape[1])
        y64 = np.asarray(y, dtype=np.int64).reshape(-1)
        if X64.shape[0] != y64.shape[0]:
            raise ValueError(f"X has {X64.shape[0]} rows but y has {y64.shape[0]}")
        if y64.size and (y64.min() < 0 or y64.max() >= self.n_classes):
            raise ValueError(f"class indices must be in [0, {self.n_classes})")
        sums = self._config.prior_weight * self._desc
        class_sums = np.zeros_like(sums)
        np.add.at(class_sums, y64, X64)
        self._X, self._y = X64, y64
        self._sums = sums + class_sums
        self._centroids = _normalize_rows(self._sums)

    def cosine(self, X: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.asarray(X, dtype=np.float64) @ self._centroids.T
        return out

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return softmax(self.cosine(X), self._config.temperature).astype(np.float32)

    def oof_proba(self) -> np.ndarray:
        """Exact leave-one-out probabilities for the fitted rows.

        Removing row i only changes its own class centroid, to normalize(S_y - x_i); its cosine with x_i
        follows from dot products already at hand, so no refit or row loop is needed.
        """
        X, y = self._X, self._y
        if y.size == 0:
            return np.zeros((0, self.n_classes), dtype=np.float32)
        cos = X @ self._centroids.T
        own_sum = self._sums[y]  # (n, d) unnormalized sum of each row's class, row included
        x_dot_s = np.einsum("ij,ij->i", X, own_sum)
        x_sq = np.einsum("ij,ij->i", X, X)
        s_sq = np.einsum("ij,ij->i", own_sum, own_sum)
        rest_sq = np.maximum(s_sq - 2.0 * x_dot_s + x_sq, 0.0)
        rest_norm = np.sqrt(rest_sq)
        # A class whose only evidence was this row (no prior) has no centroid left: cosine 0.
        own_cos = np.where(rest_norm > 1e-9, (x_dot_s - x_sq) / np.maximum(rest_norm, _EPS), 0.0)
        cos[np.arange(y.size), y] = own_cos
        return softmax(cos, self._config.temperature).astype(np.float32)


def margin(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability per row (1.0 when there is a single class)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.shape[1] < 2:
        return np.ones(p.shape[0], dtype=np.float64)
    top2 = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def _wilson_lower(successes: np.ndarray, n: np.ndarray, z: float) -> np.ndarray:
    n_f = np.asarray(n, dtype=np.float64)
    safe_n = np.maximum(n_f, 1.0)
    phat = np.asarray(successes, dtype=np.float64) / safe_n
    z2 = z * z
    centre = phat + z2 / (2.0 * safe_n)
    spread = z * np.sqrt(phat * (1.0 - phat) / safe_n + z2 / (4.0 * safe_n * safe_n))
    lower = (centre - spread) / (1.0 + z2 / safe_n)
    return np.where(n_f > 0, np.clip(lower, 0.0, 1.0), 0.0)


def wilson_lower_bound(successes: int, n: int, z: float) -> float:
    """Wilson score lower bound of a binomial proportion; 0.0 for an empty sample."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")
    return float(_wilson_lower(np.array([successes]), np.array([n]), z)[0])


def choose_threshold(
    confidence: np.ndarray, correct: np.ndarray, target: float, z: float, min_support: int
) -> float | None:
    """Smallest t such that labeled items with confidence >= t number at least min_support and the Wilson
    lower bound of their accuracy reaches target; None when no t qualifies."""
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    ok = np.asarray(correct, dtype=bool).reshape(-1)
    if conf.shape != ok.shape:
        raise ValueError("confidence and correct must have the same length")
    if conf.size == 0:
        return None
    order = np.argsort(-conf, kind="stable")
    conf_sorted = conf[order]
    n = np.arange(1, conf.size + 1)
    hits = np.cumsum(ok[order])
    # Tied confidences pass or fail together: only the last position of each tie group is a candidate.
    last_of_group = np.append(conf_sorted[1:] != conf_sorted[:-1], True)
    valid = last_of_group & (n >= min_support) & (_wilson_lower(hits, n, z) >= target)
    if not valid.any():
        return None
    return float(conf_sorted[np.flatnonzero(valid)[-1]])


def confidence_of(probs: np.ndarray) -> np.ndarray:
    """The confidence the threshold is applied to: the top class probability."""
    out: np.ndarray = np.asarray(probs, dtype=np.float64).max(axis=1)
    return out


def agreement_target(target: float, annotator_error: float, n_classes: int) -> float:
    """Model/human agreement expected when the model's true accuracy equals target.

    With people wrong at rate e, uniformly over the other k-1 classes, agreement = p(1-e) + (1-p)e/(k-1),
    increasing in p for e < (k-1)/k, so requiring agreement >= this value is requiring p >= target.
    """
    if n_classes < 2 or annotator_error <= 0.0:
        return target
    e = annotator_error
    return target * (1.0 - e) + (1.0 - target) * e / (n_classes - 1)


def calibrate(clf: CentroidClassifier, X: np.ndarray, y: np.ndarray, config: PolicyConfig) -> float | None:
    """Fit on all human labels and return the auto-accept threshold (None: accept nothing yet).

    Accuracy is judged on leave-one-out predictions, so each labeled item is scored by a model that never
    saw it.
    """
    clf.fit(X, y)
    if clf.n_fitted < config.min_human_labels:
        return None
    oof = clf.oof_proba()
    correct = oof.argmax(axis=1) == np.asarray(y, dtype=np.int64).reshape(-1)
    target = agreement_target(config.target_accuracy, config.annotator_error, clf.n_classes)
    return choose_threshold(confidence_of(oof), correct, target, config.z, config.min_support)


class DecisionKind(StrEnum):
    AUTO = "auto"
    REVIEW = "review"
    AUDIT = "audit"


@dataclass(frozen=True)
class Decision:
    kind: DecisionKind
    label: int
    confidence: float
    # Higher = more informative for people = served first.
    priority: float


def decide(
    probs: np.ndarray, threshold: float | None, audit_draws: np.ndarray, config: PolicyConfig
) -> list[Decision]:
    """Per-row decision: auto-accept above the threshold (minus a random audit share), else review.

    Reviews are prioritized by ambiguity (1 - margin), so people see the items the model is least sure
    about first; before any threshold exists they are prioritized by their random draw (see below).
    """
    p = np.asarray(probs, dtype=np.float64)
    draws = np.asarray(audit_draws, dtype=np.float64).reshape(-1)
    if draws.shape[0] != p.shape[0]:
        raise ValueError("need one audit draw per row")
    labels = p.argmax(axis=1)
    conf = confidence_of(p)
    if threshold is None:
        # Warm-up: nothing is auto-accepted yet, and the first threshold needs labeled items across the
        # whole confidence range. Ambiguous-first ordering would feed it only hard items (so the gate
        # would open hundreds of labels late); serving in random order gives an unbiased sample instead.
        acceptable = np.zeros(p.shape[0], dtype=bool)
        review_priority = draws
    else:
        acceptable = conf >= threshold
        review_priority = 1.0 - margin(p)
    audit = acceptable & (draws < config.audit_rate)
    auto = acceptable & ~audit
    priority = np.where(audit, config.audit_priority, np.where(auto, 0.0, review_priority))
    kinds = np.where(auto, 0, np.where(audit, 2, 1))
    by_code = (DecisionKind.AUTO, DecisionKind.REVIEW, DecisionKind.AUDIT)
    return [
        Decision(kind=by_code[k], label=int(lbl), confidence=float(c), priority=float(pr))
        for k, lbl, c, pr in zip(
            kinds.tolist(), labels.tolist(), conf.tolist(), priority.tolist(), strict=True
        )
    ]


def label_issues(oof_proba: np.ndarray, y: np.ndarray, min_confidence: float) -> np.ndarray:
    """Rows whose human label an out-of-fold model contradicts with confidence (confident learning).

    A row labeled i is flagged when its most likely class j != i clears class j's threshold (the
    mean out-of-fold probability of j over rows labeled j: what the model gives a class when
    people agree with it), is at least `min_confidence`, and the probability of i stays below
    class i's threshold. Returns the row indices, most confident contradictions first.
    """
    p = np.asarray(oof_proba, dtype=np.float64)
    labels = np.asarray(y, dtype=np.int64).reshape(-1)
    if p.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    k = p.shape[1]
    thresholds = np.ones(k)
    for c in range(k):
        rows = labels == c
        if rows.any():
            thresholds[c] = p[rows, c].mean()
    best = p.argmax(axis=1)
    best_p = p[np.arange(len(best)), best]
    given_p = p[np.arange(len(labels)), labels]
    flagged = (
        (best != labels)
        & (best_p >= np.maximum(thresholds[best], min_confidence))
        & (given_p < thresholds[labels])
    )
    rows = np.flatnonzero(flagged)
    return rows[np.argsort(-best_p[rows], kind="stable")]
