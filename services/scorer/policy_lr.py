"""The scorer's active-learning policy: a logistic regression on top of the labeler.

Pure numpy/scipy domain code, no I/O. While few human labels exist the model is policy.py's class
centroids; after that a multinomial logistic regression on the item embedding with the labeler's
zero-shot log-probabilities as a prior, plus one training row per label description so classes nobody
has labeled yet stay predictable. The auto-accept threshold is chosen on out-of-fold predictions so that
the lower confidence bound of the accuracy of what is auto-accepted meets the target.

Feature rows are ``features(embedding, zero_shot)`` = [embedding, log(zero_shot)]: both are already stored
per item by the scorer, so no extra inference is needed to refit. The scorer service
(services/scorer/service.py) and the offline harness (loadtests/al_offline.py) call the same functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# scipy comes with scikit-learn (a pinned dependency) and ships no type stubs.
from scipy.optimize import minimize  # type: ignore[import-untyped]

from services.scorer.policy import (
    CentroidClassifier,
    Decision,
    DecisionKind,
    PolicyConfig,
    agreement_target,
    confidence_of,
    margin,
)

_EPS = 1e-12
# Floor of the zero-shot probabilities before the log: the labeler's softmax underflows to exactly 0 for
# far-away classes, and an infinite negative prior could never be overruled by human labels.
_LOG_FLOOR = 1e-6


@dataclass(frozen=True)
class LRPolicyConfig:
    # Required accuracy of auto-accepted labels.
    target_accuracy: float = 0.95
    # Share of auto-acceptable items still sent to people (an unbiased sample of what is auto-accepted).
    audit_rate: float = 0.02
    # No auto-acceptance before this many human labels.
    min_human_labels: int = 40
    # A threshold is only trusted with at least this many labeled items (effective count) above it.
    min_support: int = 30
    # ... and with at least this many *randomly drawn* labeled items above it (warm-up, sample, audit,
    # control) whose out-of-fold accuracy (point estimate) meets the target; 0 disables the check. Most
    # labels above a threshold are items people got for their ambiguity, which the model has since
    # learned: their accuracy overstated that of the never-ambiguous items waiting above it (AG News at
    # 0.98: 669 items accepted in one refit at 0.9765). The random ones are an unbiased sample of what
    # the threshold accepts, too few for a bound of their own but enough to veto a threshold they refute.
    min_random_support: int = 10
    # One-sided z of the Wilson lower bound (1.645 = 95%). A threshold is re-estimated at every refit and
    # each estimate auto-accepts items for good, so a run acts on its luckiest estimates: at 1.28 the
    # auto-accepted AG News labels came out at 94.9% for a 95% target, at 1.645 at 95.8%. Only the share
    # at which a run finishes pays for it, not the pool accuracy at a given human share.
    z: float = 1.645
    # Assumed annotator error rate: human labels are the reference, so their errors look like model errors.
    # 0.0 judges agreement against the target itself (conservative). Crediting 2% annotator error let
    # AG News auto-accept at 94.1% for a 95% target, so it is not the default.
    annotator_error: float = 0.0
    # Priority of audit tasks: between confident and ambiguous reviews.
    audit_priority: float = 0.5
    # Human labels before the logistic regression replaces the centroids.
    min_lr_labels: int = 20
    # L2 penalty on the embedding weights (loss is summed over rows, so labels outweigh it as they grow).
    l2: float = 0.01
    # Training weight of each label-description row, in units of labeled examples.
    desc_weight: float = 1.0
    # Probability mass a description row spreads over the other classes in its zero-shot prior features.
    # 1.0 = a flat prior: a peaked one lets the prior scale alone fit the description rows, so they teach
    # the embedding weights nothing (measured: flat is 1-2 points more accurate on BANKING77/CLINC150 at
    # 50-600 labels, and a class nobody labeled is only predictable with it).
    desc_smoothing: float = 1.0
    # Folds for the out-of-fold predictions the threshold is chosen on.
    folds: int = 5
    max_iter: int = 300
    # L-BFGS stops when an iteration lowers the loss by less than this fraction. scipy's default (2.2e-9)
    # spends two thirds of a CLINC150 refit polishing digits: at 1e-6 the same 1,200 labels refit 2.8x
    # faster with the same thresholds (to 1e-3) and the same pool accuracy (to 5e-4).
    ftol: float = 1e-6
    # Centroid settings, used in the first phase.
    temperature: float = 0.05
    prior_weight: float = 4.0
    # Weight labeled items by the inverse of their chance of being picked, so that the hard items people
    # review by design do not drag the accuracy estimate of the confident region down. Off: the few
    # randomly drawn items then carry nearly all the weight, the effective sample size stays under
    # min_support, and on BANKING77 (95% target) nothing was auto-accepted by 50% human share.
    importance_weighting: bool = False
    # Review order after warm-up: "margin" (top-1 minus top-2, smallest first) or "confidence" (top-1
    # probability, smallest first: the items most likely to be wrong).
    review_by: str = "margin"
    # Self-training: unlabeled items predicted at or above this probability join the training set with
    # this weight (0 disables it). Off: on AG News (weight 0.5, p >= 0.95) it moved pool accuracy by under
    # a point below 20% human share, froze it at 94% beyond, and let auto-accepted accuracy fall to 92.7%.
    pseudo_label_weight: float = 0.0
    pseudo_label_threshold: float = 0.98
    # Consecutive refits whose threshold estimates must all exist; the strictest one is in force (see
    # threshold_in_force).
    confirmations: int = 2

    def centroid_config(self) -> PolicyConfig:
        return PolicyConfig(
            target_accuracy=self.target_accuracy,
            audit_rate=self.audit_rate,
            min_human_labels=self.min_human_labels,
            min_support=self.min_support,
            z=self.z,
            temperature=self.temperature,
            prior_weight=self.prior_weight,
            annotator_error=self.annotator_error,
            audit_priority=self.audit_priority,
        )


def features(embeddings: np.ndarray, zero_shot: np.ndarray) -> np.ndarray:
    """Model input rows: [embedding, log(zero-shot probabilities)], float64."""
    emb = np.asarray(embeddings, dtype=np.float64)
    zs = np.asarray(zero_shot, dtype=np.float64)
    if emb.shape[0] != zs.shape[0]:
        raise ValueError("need one zero-shot row per embedding")
    return np.hstack([emb, np.log(np.maximum(zs, _LOG_FLOOR))])


def description_features(label_embeddings: np.ndarray, smoothing: float) -> np.ndarray:
    """One row per class: its description embedding with a smoothed one-hot 'zero-shot' prior."""
    desc = np.asarray(label_embeddings, dtype=np.float64)
    k = desc.shape[0]
    off = smoothing / max(k - 1, 1)
    prior = np.full((k, k), off)
    # smoothing >= (k-1)/k makes the prior flat: the row then carries no zero-shot evidence at all.
    np.fill_diagonal(prior, max(1.0 - smoothing, off) if k > 1 else 1.0)
    return features(desc, prior)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


@dataclass
class _Params:
    W: np.ndarray  # (d, k) embedding weights
    b: np.ndarray  # (k,) class biases
    a: float  # scale of the zero-shot log-prior

    def flat(self) -> np.ndarray:
        return np.concatenate([self.W.ravel(), self.b, [self.a]])

    @staticmethod
    def unflat(theta: np.ndarray, d: int, k: int) -> _Params:
        return _Params(theta[: d * k].reshape(d, k), theta[d * k : d * k + k], float(theta[-1]))


class PriorLogisticRegression:
    """Multinomial logistic regression on [embedding, log zero-shot] with a tied prior block.

    logits = a * log(zero_shot) + embedding @ W + b. Tying the zero-shot block to a single scale a (rather
    than a free k x k matrix) makes the labeler's distribution a prior the model starts from: with W = 0,
    b = 0, a = 1 it reproduces the labeler exactly, and only W (L2-penalized) has to be learned from labels.
    """

    def __init__(self, label_embeddings: np.ndarray, config: LRPolicyConfig) -> None:
        self._desc_rows = description_features(label_embeddings, config.desc_smoothing)
        self._k = int(self._desc_rows.shape[0])
        self._d = int(np.asarray(label_embeddings).shape[1])
        self._config = config
        self._params = _Params(np.zeros((self._d, self._k)), np.zeros(self._k), 1.0)

    @property
    def params(self) -> _Params:
        return self._params

    def _split(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return X[:, : self._d], X[:, self._d :]

    def _logits(self, p: _Params, X: np.ndarray) -> np.ndarray:
        emb, logzs = self._split(X)
        out: np.ndarray = p.a * logzs + emb @ p.W + p.b
        return out

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        sample_weight: np.ndarray | None = None,
        init: _Params | None = None,
    ) -> _Params:
        """Fit on labeled rows plus the description rows; warm-started from init (or the last fit)."""
        Xl = np.asarray(X, dtype=np.float64).reshape(-1, self._d + self._k)
        yl = np.asarray(y, dtype=np.int64).reshape(-1)
        if Xl.shape[0] != yl.shape[0]:
            raise ValueError(f"X has {Xl.shape[0]} rows but y has {yl.shape[0]}")
        if yl.size and (yl.min() < 0 or yl.max() >= self._k):
            raise ValueError(f"class indices must be in [0, {self._k})")
        sw = np.ones(yl.size) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        Xa = np.vstack([Xl, self._desc_rows])
        ya = np.concatenate([yl, np.arange(self._k)])
        wa = np.concatenate([sw, np.full(self._k, self._config.desc_weight)])
        emb64, logzs64 = self._split(Xa)
        # The products run in float32 (a third less time than float64 on one BLAS thread over a CLINC150
        # label sequence, same thresholds and pool accuracy); losses and the optimizer's state stay float64.
        emb = np.ascontiguousarray(emb64, dtype=np.float32)
        emb_t = np.ascontiguousarray(emb.T)
        logzs = np.ascontiguousarray(logzs64, dtype=np.float32)
        row_weight = wa.astype(np.float32)[:, None]
        rows = np.arange(ya.size)
        d, k, lam = self._d, self._k, self._config.l2

        def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
            p = _Params.unflat(theta, d, k)
            logits = emb @ p.W.astype(np.float32)
            logits += np.float32(p.a) * logzs
            logits += p.b.astype(np.float32)
            logits -= logits.max(axis=1, keepdims=True)
            e = np.exp(logits)
            total = e.sum(axis=1)
            logp_true = logits[rows, ya].astype(np.float64) - np.log(total.astype(np.float64))
            # Biases are penalized too: early labels cover few classes, and free biases would push every
            # class nobody has labeled yet below the labeled ones.
            loss = -float(wa @ logp_true) + 0.5 * lam * float(p.W.ravel() @ p.W.ravel() + p.b @ p.b)
            # Gradient of the weighted cross-entropy with respect to the logits: softmax minus one-hot.
            e /= total[:, None]
            e[rows, ya] -= 1.0
            e *= row_weight
            gW = (emb_t @ e).astype(np.float64) + lam * p.W
            gb = e.sum(axis=0, dtype=np.float64) + lam * p.b
            ga = float(np.einsum("ij,ij->", e, logzs, dtype=np.float64))
            return loss, np.concatenate([gW.ravel(), gb, [ga]])

        start = init if init is not None else self._params
        res = minimize(
            loss_grad,
            start.flat(),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": self._config.max_iter, "gtol": 1e-5, "ftol": self._config.ftol},
        )
        self._params = _Params.unflat(np.asarray(res.x, dtype=np.float64), d, k)
        return self._params

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        Xf = np.asarray(X, dtype=np.float64).reshape(-1, self._d + self._k)
        return _softmax(self._logits(self._params, Xf)).astype(np.float32)

    def proba_with(self, params: _Params, X: np.ndarray) -> np.ndarray:
        return _softmax(self._logits(params, np.asarray(X, dtype=np.float64))).astype(np.float32)


def fold_of(n: int, folds: int) -> np.ndarray:
    """Fold of each row by arrival order: stable as rows are appended, so a row never changes fold."""
    return np.arange(n) % folds


class LRClassifier:
    """Centroids for the first few labels, then PriorLogisticRegression; same interface as
    policy.CentroidClassifier (fit, predict_proba, oof_proba), on feature rows from ``features``."""

    def __init__(self, label_embeddings: np.ndarray, config: LRPolicyConfig) -> None:
        self._config = config
        self._label_emb = np.asarray(label_embeddings, dtype=np.float64)
        self._d = int(self._label_emb.shape[1])
        self._k = int(self._label_emb.shape[0])
        self._centroids = CentroidClassifier(self._label_emb, config.centroid_config())
        self._lr = PriorLogisticRegression(self._label_emb, config)
        self._X = np.zeros((0, self._d + self._k))
        self._y = np.zeros(0, dtype=np.int64)
        self._fold_params: dict[int, _Params] = {}
        self._oof: np.ndarray | None = None
        # Rows, labels and weights the regression was last trained on (labeled rows first).
        self._train: tuple[np.ndarray, np.ndarray, np.ndarray] = (self._X, self._y, np.zeros(0))
        self.uses_lr = False

    @property
    def n_classes(self) -> int:
        return self._k

    @property
    def n_fitted(self) -> int:
        return int(self._y.shape[0])

    def fit(self, X: np.ndarray, y: np.ndarray, pseudo: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Refit on all labeled rows (appended in arrival order). pseudo = (rows, labels) of confident
        unlabeled items for self-training; they train the model but are never scored out-of-fold."""
        Xf = np.asarray(X, dtype=np.float64).reshape(-1, self._d + self._k)
        yf = np.asarray(y, dtype=np.int64).reshape(-1)
        self._X, self._y = Xf, yf
        self._oof = None
        self.uses_lr = yf.size >= self._config.min_lr_labels
        if not self.uses_lr:
            self._centroids.fit(Xf[:, : self._d], yf)
            return
        if pseudo is not None and pseudo[1].size and self._config.pseudo_label_weight > 0:
            Xt = np.vstack([Xf, pseudo[0]])
            yt = np.concatenate([yf, pseudo[1]])
            wt = np.concatenate([np.ones(yf.size), np.full(pseudo[1].size, self._config.pseudo_label_weight)])
        else:
            Xt, yt, wt = Xf, yf, np.ones(yf.size)
        self._lr.fit(Xt, yt, wt)
        self._train = (Xt, yt, wt)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        Xf = np.asarray(X, dtype=np.float64).reshape(-1, self._d + self._k)
        if not self.uses_lr:
            return self._centroids.predict_proba(Xf[:, : self._d])
        return self._lr.predict_proba(Xf)

    def oof_proba(self) -> np.ndarray:
        """Out-of-fold probabilities of the labeled rows: exact leave-one-out for centroids, k-fold for the
        regression. Each fold model is warm-started from the same fold's model of the previous refit, which
        never saw this fold's rows either (folds are fixed by arrival order), so nothing leaks."""
        if self._oof is not None:
            return self._oof
        n = self.n_fitted
        if not self.uses_lr:
            self._oof = self._centroids.oof_proba()
            return self._oof
        Xt, yt, wt = self._train
        fold = fold_of(n, self._config.folds)
        # Pseudo-labeled rows are predictions of a model that saw every labeled row: keep them out of the
        # fold models, or the held-out rows would leak back in through them.
        out = np.zeros((n, self._k), dtype=np.float32)
        for f in range(self._config.folds):
            held = fold == f
            if not held.any():
                continue
            train = np.flatnonzero(~held)
            init = self._fold_params.get(f, _Params(np.zeros((self._d, self._k)), np.zeros(self._k), 1.0))
            params = self._lr_fold().fit(Xt[train], yt[train], wt[train], init=init)
            self._fold_params[f] = params
            out[held] = self._lr.proba_with(params, self._X[held])
        self._oof = out
        return out

    def _lr_fold(self) -> PriorLogisticRegression:
        return PriorLogisticRegression(self._label_emb, self._config)


def _wilson_lower(phat: np.ndarray, n: np.ndarray, z: float) -> np.ndarray:
    safe_n = np.maximum(n, 1.0)
    z2 = z * z
    centre = phat + z2 / (2.0 * safe_n)
    spread = z * np.sqrt(np.maximum(phat * (1.0 - phat), 0.0) / safe_n + z2 / (4.0 * safe_n * safe_n))
    lower = (centre - spread) / (1.0 + z2 / safe_n)
    return np.where(n > 0, np.clip(lower, 0.0, 1.0), 0.0)


def choose_threshold_weighted(
    confidence: np.ndarray,
    correct: np.ndarray,
    weights: np.ndarray | None,
    target: float,
    z: float,
    min_support: int,
    random: np.ndarray | None = None,
    min_random: int = 0,
) -> float | None:
    """Smallest t whose labeled items at or above it have a Wilson lower bound of their (weighted) accuracy
    at or above target, with at least min_support items; None when no t qualifies.

    random: per item, whether it was drawn at random rather than picked for its ambiguity. With it (and
    min_random > 0), t also needs at least min_random random items at or above it, whose plain accuracy
    is at or above target.

    With weights, the accuracy is the weighted mean and the bound uses Kish's effective sample size
    (sum w)^2 / sum w^2, so a few heavily weighted items cannot pass for a large sample. With unit weights
    this is policy.choose_threshold.
    """
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    ok = np.asarray(correct, dtype=bool).reshape(-1)
    w = np.ones(conf.size) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if conf.shape != ok.shape or conf.shape != w.shape:
        raise ValueError("confidence, correct and weights must have the same length")
    if conf.size == 0:
        return None
    order = np.argsort(-conf, kind="stable")
    conf_sorted, ok_sorted, w_sorted = conf[order], ok[order], w[order]
    count = np.arange(1, conf.size + 1)
    sw = np.cumsum(w_sorted)
    sw2 = np.cumsum(w_sorted * w_sorted)
    phat = np.cumsum(w_sorted * ok_sorted) / np.maximum(sw, _EPS)
    n_eff = sw * sw / np.maximum(sw2, _EPS)
    last_of_group = np.append(conf_sorted[1:] != conf_sorted[:-1], True)
    valid = (
        last_of_group
        & (count >= min_support)
        & (n_eff >= min_support)
        & (_wilson_lower(phat, n_eff, z) >= target)
    )
    if random is not None and min_random > 0:
        rnd = np.asarray(random, dtype=bool).reshape(-1)
        if rnd.shape != conf.shape:
            raise ValueError("random must have one flag per item")
        rnd_sorted = rnd[order]
        n_random = np.cumsum(rnd_sorted)
        random_correct = np.cumsum(rnd_sorted & ok_sorted)
        valid &= (n_random >= min_random) & (random_correct >= target * n_random)
    if not valid.any():
        return None
    return float(conf_sorted[np.flatnonzero(valid)[-1]])


def calibrate(
    clf: LRClassifier,
    X: np.ndarray,
    y: np.ndarray,
    config: LRPolicyConfig,
    selection_prob: np.ndarray | None = None,
    pseudo: tuple[np.ndarray, np.ndarray] | None = None,
    random: np.ndarray | None = None,
) -> float | None:
    """Fit on all human labels and return the auto-accept threshold (None: accept nothing yet).

    random: per labeled row, whether it was drawn at random (see LRPolicyConfig.min_random_support);
    None skips that check.

    selection_prob: per labeled row, the chance it had of being picked for people (1.0 for a review of
    an ambiguous item, the audit rate for an audit, the sampled share for warm-up draws). With
    importance_weighting the threshold is estimated with weights 1/selection_prob.
    """
    clf.fit(X, y, pseudo=pseudo)
    if clf.n_fitted < config.min_human_labels:
        return None
    oof = clf.oof_proba()
    yy = np.asarray(y, dtype=np.int64).reshape(-1)
    correct = oof.argmax(axis=1) == yy
    weights = None
    if config.importance_weighting and selection_prob is not None:
        weights = 1.0 / np.clip(np.asarray(selection_prob, dtype=np.float64), 1e-3, 1.0)
    target = agreement_target(config.target_accuracy, config.annotator_error, clf.n_classes)
    return choose_threshold_weighted(
        confidence_of(oof),
        correct,
        weights,
        target,
        config.z,
        config.min_support,
        random,
        config.min_random_support,
    )


def threshold_in_force(estimates: Sequence[float | None], confirmations: int) -> float | None:
    """The auto-accept threshold to act on, given the estimates of the last refits (newest last):
    the strictest of the last `confirmations`, or None while fewer exist or any of them is None.

    The threshold is re-estimated every few labels and each estimate auto-accepts items for good,
    so acting on every estimate lets the luckiest of many noisy ones through. Requiring consecutive
    estimates to agree removes isolated dips.
    """
    if confirmations < 1:
        raise ValueError(f"confirmations must be at least 1, got {confirmations}")
    recent = list(estimates)[-confirmations:]
    found = [t for t in recent if t is not None]
    if len(found) < confirmations:
        return None
    return max(found)


@dataclass(frozen=True)
class Routing:
    """Vectorized decisions for a batch of items (the scorer turns rows into policy.Decision if needed)."""

    kind: np.ndarray  # int8 codes: 0 auto, 1 review, 2 audit
    label: np.ndarray
    confidence: np.ndarray
    priority: np.ndarray

    def decisions(self) -> list[Decision]:
        by_code = (DecisionKind.AUTO, DecisionKind.REVIEW, DecisionKind.AUDIT)
        return [
            Decision(kind=by_code[k], label=int(lbl), confidence=float(c), priority=float(pr))
            for k, lbl, c, pr in zip(
                self.kind.tolist(),
                self.label.tolist(),
                self.confidence.tolist(),
                self.priority.tolist(),
                strict=True,
            )
        ]


def route(
    probs: np.ndarray, threshold: float | None, draws: np.ndarray, n_labels: int, config: LRPolicyConfig
) -> Routing:
    """Auto-accept above the threshold (minus the audit share); everything else goes to people.

    Before min_human_labels exist people get a random sample (priority = draw), so the first threshold is
    estimated on items across the whole confidence range. After that reviews go ambiguous-first
    (1 - margin, ties broken by the draw, i.e. by item id) even while no threshold exists, and the audit
    share (a random sample, of the auto-acceptable items once a threshold exists, of all items before)
    keeps labeled items flowing into the confident region the threshold is estimated on.
    """
    p = np.asarray(probs, dtype=np.float64)
    u = np.asarray(draws, dtype=np.float64).reshape(-1)
    if u.shape[0] != p.shape[0]:
        raise ValueError("need one draw per row")
    labels = p.argmax(axis=1)
    conf = confidence_of(p)
    if n_labels < config.min_human_labels:
        kind = np.ones(p.shape[0], dtype=np.int8)
        return Routing(kind, labels, conf, u)
    acceptable = conf >= threshold if threshold is not None else np.zeros(p.shape[0], dtype=bool)
    sampled = u < config.audit_rate
    audit = sampled & acceptable if threshold is not None else sampled
    auto = acceptable & ~audit
    # The draw only breaks ties: it is scaled far below any real margin difference.
    ambiguity = 1.0 - conf if config.review_by == "confidence" else 1.0 - margin(p)
    review_priority = ambiguity + 1e-9 * u
    priority = np.where(audit, config.audit_priority, np.where(auto, 0.0, review_priority))
    kind = np.where(auto, 0, np.where(audit, 2, 1)).astype(np.int8)
    return Routing(kind, labels, conf, priority)


@dataclass(frozen=True)
class HumanBudget:
    """A cap on human labels, as a share of the pool or an absolute count (the smaller one wins)."""

    share: float | None = None
    count: int | None = None

    def limit(self, n_items: int) -> int:
        caps = [n_items]
        if self.share is not None:
            caps.append(int(np.floor(self.share * n_items + 1e-9)))
        if self.count is not None:
            caps.append(self.count)
        return max(0, min(caps))

    def exhausted(self, used: int, n_items: int) -> bool:
        return used >= self.limit(n_items)


@dataclass(frozen=True)
class Finalized:
    """Labels for items still open when the human budget ran out."""

    label: np.ndarray
    confidence: np.ndarray
    # True where the label did not clear the auto-accept threshold: it is below the project's target and
    # should be presented as such (or re-queued if budget is added).
    below_target: np.ndarray


def finalize_remaining(probs: np.ndarray, threshold: float | None) -> Finalized:
    """Finalize open items with the model's label once people are out of budget."""
    p = np.asarray(probs, dtype=np.float64)
    conf = confidence_of(p)
    below = np.ones(p.shape[0], dtype=bool) if threshold is None else conf < threshold
    return Finalized(label=p.argmax(axis=1), confidence=conf, below_target=below)
