"""The project's classifier: class centroids for the first labels, then a logistic regression on top
of the labeler.

Pure numpy/scipy domain code, no I/O. A multinomial logistic regression on the item embedding with the
labeler's zero-shot log-probabilities as a prior, plus one training row per label description so classes
nobody has labeled yet stay predictable. Rows come from features.features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# scipy comes with scikit-learn (a pinned dependency) and ships no type stubs.
from scipy.optimize import minimize  # type: ignore[import-untyped]

from services.scorer.policy.centroids import CentroidClassifier, PolicyConfig
from services.scorer.policy.features import description_features
from services.scorer.policy.neighbours import blend, neighbour_proba, unit_rows

_EPS = 1e-12


@dataclass(frozen=True)
class LRPolicyConfig:
    # Accuracy the project's guarantee promises (the project's own target overrides it).
    target_accuracy: float = 0.95
    # Human labels drawn at random before people's queue is ranked by ambiguity, and before anything
    # is proposed for automatic acceptance.
    min_human_labels: int = 40
    # Human labels before the logistic regression replaces the centroids.
    min_lr_labels: int = 20
    # L2 penalty on the embedding weights (loss is summed over rows, so labels outweigh it as they grow):
    # the value used until one is chosen from l2_grid, and always when the grid is empty.
    l2: float = 0.01
    # Penalties tried per project, the one with the lowest out-of-fold log-loss kept. Which one is best
    # differs by pool (measured on 1,000 random labels, accuracy on the rest: AG News 0.837 at 0.01,
    # 0.865 at 0.3; CLINC150 0.882 at 0.01, 0.887 at 0.001; Banking77 0.848 at 0.01, 0.852 at 0.001).
    l2_grid: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)
    # Chosen again once the labels have grown by this factor since the last choice (a handful of
    # choices over a project's life, each a few fits per grid value).
    l2_reselect_growth: float = 1.5
    # Folds of the choice (fewer than `folds`: it only has to rank penalties).
    l2_select_folds: int = 3
    # At most this many labeled rows take part in the choice (evenly spaced in arrival order): on
    # CLINC150 it takes 11 s on 2,000 labels on one core, and grows with them.
    l2_select_max_rows: int = 2000
    # Training weight of each label-description row, in units of labeled examples.
    desc_weight: float = 1.0
    # Probability mass a description row spreads over the other classes in its zero-shot prior features.
    # 1.0 = a flat prior: a peaked one lets the prior scale alone fit the description rows, so they teach
    # the embedding weights nothing (measured: flat is 1-2 points more accurate on BANKING77/CLINC150 at
    # 50-600 labels, and a class nobody labeled is only predictable with it).
    desc_smoothing: float = 1.0
    # Folds for the out-of-fold predictions the label-error audit rests on.
    folds: int = 5
    # Those predictions are made again once the labels have grown by this factor since the last
    # time, not at every refit: five fold fits cost a CLINC150 refit 2.5-5 s beside its 0.5-1 s fit
    # (1,500-4,000 labels, one core), and the labels they check wait a few more refits at most.
    oof_refresh_growth: float = 1.1
    max_iter: int = 300
    # L-BFGS stops when an iteration lowers the loss by less than this fraction. scipy's default (2.2e-9)
    # spends two thirds of a CLINC150 refit polishing digits: at 1e-6 the same 1,200 labels refit 2.8x
    # faster with the same pool accuracy (to 5e-4).
    ftol: float = 1e-6
    # Centroid settings, used in the first phase.
    temperature: float = 0.05
    prior_weight: float = 4.0
    # Self-training: unlabeled items predicted at or above this probability join the training set with
    # this weight (0 disables it). Off: on AG News (weight 0.5, p >= 0.95) it moved pool accuracy by under
    # a point below 20% human share and froze it at 94% beyond.
    pseudo_label_weight: float = 0.0
    pseudo_label_threshold: float = 0.98
    # The neighbours' view (policy.neighbours): the labels of the k most similar labeled items, mixed
    # into the regression's distribution at the weight of this grid with the lowest out-of-fold
    # log-loss, chosen with the penalty (an empty l2_grid chooses nothing: the regression alone).
    # Off by default, (0.0,): offline (loadtests.al_offline, 0.95) the grid (0.0, 0.25, 0.5, 0.75)
    # cut the human share on AG News 0.625 -> 0.561, Banking77 0.690 -> 0.568, CLINC150
    # 0.429 -> 0.409, but through the real services (tandem bench labeling, one run each) it cost
    # more: CLINC150 68.8% against 52.4%, Banking77 59.6% against 57.6% (docs/benchmarks.md, P-nb).
    neighbours_weights: tuple[float, ...] = (0.0,)
    neighbours_k: int = 10
    neighbours_temperature: float = 0.05
    # At most this many labeled rows vote (evenly spaced in arrival order): a re-scored slice costs
    # rows x this many dot products (10,000 x 5,000: about a second on one core).
    neighbours_max_rows: int = 5000

    def centroid_config(self) -> PolicyConfig:
        return PolicyConfig(temperature=self.temperature, prior_weight=self.prior_weight)


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

    def __init__(self, label_embeddings: np.ndarray, config: LRPolicyConfig, l2: float | None = None) -> None:
        self._desc_rows = description_features(label_embeddings, config.desc_smoothing)
        self._k = int(self._desc_rows.shape[0])
        self._d = int(np.asarray(label_embeddings).shape[1])
        self._config = config
        self.l2 = config.l2 if l2 is None else l2
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
        d, k, lam = self._d, self._k, self.l2

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
        # Labeled rows (the first ones, in arrival order) the out-of-fold predictions cover.
        self.oof_labels = 0
        # Rows, labels and weights the regression was last trained on (labeled rows first).
        self._train: tuple[np.ndarray, np.ndarray, np.ndarray] = (self._X, self._y, np.zeros(0))
        self.uses_lr = False
        # The label count the L2 penalty in use (self.l2) was chosen at (0: not chosen yet).
        self.l2_chosen_at = 0
        # Weight of the neighbours' view, chosen with the penalty, and the labeled rows that vote.
        self.neighbours_weight = 0.0
        self._ref = np.zeros((0, self._d), dtype=np.float32)
        self._ref_y = np.zeros(0, dtype=np.int64)
        self._ref_w = np.zeros(0)

    @property
    def n_classes(self) -> int:
        return self._k

    @property
    def n_fitted(self) -> int:
        return int(self._y.shape[0])

    @property
    def l2(self) -> float:
        """The L2 penalty the regression fits with (config.l2 until one is chosen)."""
        return self._lr.l2

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        pseudo: tuple[np.ndarray, np.ndarray] | None = None,
        weight: np.ndarray | None = None,
    ) -> None:
        """Refit on all labeled rows (appended in arrival order). pseudo = (rows, labels) of confident
        unlabeled items for self-training; they train the model but are never scored out-of-fold.
        weight: per labeled row (an aggregated label's posterior), 1 when None."""
        Xf = np.asarray(X, dtype=np.float64).reshape(-1, self._d + self._k)
        yf = np.asarray(y, dtype=np.int64).reshape(-1)
        self._X, self._y = Xf, yf
        self.uses_lr = yf.size >= self._config.min_lr_labels
        if not self.uses_lr:
            self._centroids.fit(Xf[:, : self._d], yf)
            return
        wl = np.ones(yf.size) if weight is None else np.asarray(weight, dtype=np.float64).reshape(-1)
        if pseudo is not None and pseudo[1].size and self._config.pseudo_label_weight > 0:
            Xt = np.vstack([Xf, pseudo[0]])
            yt = np.concatenate([yf, pseudo[1]])
            wt = np.concatenate([wl, np.full(pseudo[1].size, self._config.pseudo_label_weight)])
        else:
            Xt, yt, wt = Xf, yf, wl
        if self._config.l2_grid and yf.size >= self._config.l2_reselect_growth * self.l2_chosen_at:
            chosen = choose_fit(self._label_emb, self._config, Xf, yf, wl)
            self._lr.l2, self.neighbours_weight = chosen.l2, chosen.neighbours_weight
            self.l2_chosen_at = int(yf.size)
        self._lr.fit(Xt, yt, wt)
        self._train = (Xt, yt, wt)
        if self.neighbours_weight > 0:
            rows = _evenly_spaced(yf.size, self._config.neighbours_max_rows)
            self._ref, self._ref_y, self._ref_w = unit_rows(Xf[rows, : self._d]), yf[rows], wl[rows]

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        Xf = np.asarray(X, dtype=np.float64).reshape(-1, self._d + self._k)
        if not self.uses_lr:
            return self._centroids.predict_proba(Xf[:, : self._d])
        return self._with_neighbours(self._lr.predict_proba(Xf), Xf, self._ref, self._ref_y, self._ref_w)

    def _with_neighbours(
        self, p: np.ndarray, X: np.ndarray, ref: np.ndarray, ref_y: np.ndarray, ref_w: np.ndarray
    ) -> np.ndarray:
        """The regression's distribution `p` of rows X blended with their neighbours' among `ref`."""
        if self.neighbours_weight <= 0:
            return p
        cfg = self._config
        near = neighbour_proba(
            ref, ref_y, ref_w, unit_rows(X[:, : self._d]), p, cfg.neighbours_k, cfg.neighbours_temperature
        )
        return blend(p, near, self.neighbours_weight)

    def oof_due(self) -> bool:
        """True when the labels have grown enough since the last out-of-fold predictions
        (config.oof_refresh_growth) to make them again."""
        n = self.n_fitted
        return n > self.oof_labels and n >= round(self._config.oof_refresh_growth * self.oof_labels, 6)

    def oof_proba(self) -> np.ndarray:
        """Out-of-fold probabilities of the first `oof_labels` labeled rows, as of the last
        refresh_oof (made now when there is none yet)."""
        if self._oof is None:
            self.refresh_oof()
        assert self._oof is not None
        return self._oof

    def refresh_oof(self) -> None:
        """Out-of-fold probabilities of the rows of the last fit: exact leave-one-out for
        centroids, k-fold for the regression. Each fold model is warm-started from the same fold's
        model of the previous refresh, which never saw this fold's rows either (folds are fixed by
        arrival order), so nothing leaks."""
        n = self.n_fitted
        if not self.uses_lr:
            self._oof, self.oof_labels = self._centroids.oof_proba(), n
            return
        Xt, yt, wt = self._train
        fold = fold_of(n, self._config.folds)
        # Pseudo-labeled rows are predictions of a model that saw every labeled row: keep them out of the
        # fold models, or the held-out rows would leak back in through them.
        out = np.zeros((n, self._k), dtype=np.float32)
        for f in range(self._config.folds):
            held = np.flatnonzero(fold == f)
            if not held.size:
                continue
            train = np.flatnonzero(fold != f)
            init = self._fold_params.get(f, _Params(np.zeros((self._d, self._k)), np.zeros(self._k), 1.0))
            params = self._lr_fold().fit(Xt[train], yt[train], wt[train], init=init)
            self._fold_params[f] = params
            held_X = self._X[held]
            p = self._lr.proba_with(params, held_X)
            if self.neighbours_weight > 0:
                # The neighbours vote from the same training rows (labeled ones: `fold` covers only those).
                ref = unit_rows(self._X[train, : self._d])
                p = self._with_neighbours(p, held_X, ref, yt[train], wt[train])
            out[held] = p
        # Set together: label_issues reads the predictions against the labels they cover.
        self._oof, self.oof_labels = out, n

    def _lr_fold(self) -> PriorLogisticRegression:
        return PriorLogisticRegression(self._label_emb, self._config, self.l2)


@dataclass(frozen=True)
class FitChoice:
    l2: float  # penalty of the regression
    neighbours_weight: float  # weight of the neighbours' view in the blend


def _evenly_spaced(n: int, limit: int) -> np.ndarray:
    """At most `limit` row indices of n, evenly spaced in arrival order."""
    if n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).astype(np.int64))


def choose_fit(
    label_embeddings: np.ndarray, config: LRPolicyConfig, X: np.ndarray, y: np.ndarray, w: np.ndarray
) -> FitChoice:
    """The penalty of config.l2_grid and the neighbours' weight of config.neighbours_weights with the
    lowest out-of-fold log-loss on the labeled rows.

    Folds by arrival order (fold_of). The grid is walked from the strongest penalty to the weakest,
    each fit warm-started from the previous penalty's fit of the same fold (a regularization path:
    neighbouring solutions are close, so each fit takes few iterations). The neighbours of a held-out
    row vote from the other folds' rows, like the regression that predicts it; on ties the smaller
    neighbours' weight wins."""
    grid = sorted(config.l2_grid, reverse=True)
    rows = _evenly_spaced(int(y.size), config.l2_select_max_rows)
    X, y, w = X[rows], y[rows], w[rows]
    folds = max(2, min(config.l2_select_folds, int(y.size)))
    fold = fold_of(int(y.size), folds)
    k, d = int(label_embeddings.shape[0]), int(label_embeddings.shape[1])
    weights = sorted(set(config.neighbours_weights) | {0.0})
    with_view = len(weights) > 1
    unit = unit_rows(X[:, :d]) if with_view else X[:, :0]
    starts = [_Params(np.zeros((d, k)), np.zeros(k), 1.0) for _ in range(folds)]
    best, best_loss = FitChoice(grid[0], 0.0), np.inf
    scored = np.zeros(y.size, dtype=bool)
    for l2 in grid:
        model = PriorLogisticRegression(label_embeddings, config, l2)
        p = np.full((y.size, k), 1.0 / k, dtype=np.float32)
        near = p.copy() if with_view else p  # with the view off, blend(p, near, 0) is p
        for f in range(folds):
            held = fold == f
            if not held.any() or held.all():
                continue
            starts[f] = model.fit(X[~held], y[~held], w[~held], init=starts[f])
            p[held] = model.proba_with(starts[f], X[held])
            scored |= held
            if with_view:
                near[held] = neighbour_proba(
                    unit[~held],
                    y[~held],
                    w[~held],
                    unit[held],
                    p[held],
                    config.neighbours_k,
                    config.neighbours_temperature,
                )
        for weight in weights:
            mixed = blend(p, near, weight)
            # Summed fold by fold, in fold order: with the view off the losses are bit for bit
            # those of the penalty choice before the view, and so are its choices on near-ties.
            loss = 0.0
            for f in range(folds):
                held = (fold == f) & scored
                loss -= float(w[held] @ np.log(np.maximum(mixed[held, y[held]], _EPS)))
            if loss < best_loss:
                best, best_loss = FitChoice(l2, weight), loss
    return best
