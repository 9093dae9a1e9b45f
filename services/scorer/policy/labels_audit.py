"""Confident learning: human labels an out-of-fold model contradicts with confidence, sent to a
second person (Northcutt et al., confident learning). Pure numpy, no I/O."""

from __future__ import annotations

import numpy as np


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
