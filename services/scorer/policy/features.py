"""Model input rows: the item embedding and the labeler's zero-shot log-probabilities, both stored per
item by the scorer, so a refit needs no extra inference. Pure numpy, no I/O."""

from __future__ import annotations

import numpy as np

# Floor of the zero-shot probabilities before the log: the labeler's softmax underflows to exactly 0 for
# far-away classes, and an infinite negative prior could never be overruled by human labels.
_LOG_FLOOR = 1e-6


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
