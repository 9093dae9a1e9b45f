"""Class centroids on normalized embeddings: the project's model for its first few labels, before
a regression has enough to learn from. Pure numpy, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_EPS = 1e-12


@dataclass(frozen=True)
class PolicyConfig:
    # Softmax temperature over cosine similarities.
    temperature: float = 0.05
    # Weight of the label-description embedding in each centroid, in units of labeled examples: it
    # carries zero-shot knowledge early and fades as labels accumulate.
    prior_weight: float = 4.0


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
