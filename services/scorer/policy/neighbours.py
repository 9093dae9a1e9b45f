"""A second view of an item: the labels of its nearest labeled neighbours in embedding space.

The regression draws one linear boundary per class through the embedding; an intent with two
phrasings, or a topic with a pocket of odd articles, is a local shape it smooths over. The labels of
the closest labeled items see such pockets, and the two views err on different items: blended, the
model is both more accurate and better at telling its sure labels from its unsure ones (what
automatic acceptance draws on). How much each view counts is chosen per project from out-of-fold
log-loss (model.choose_fit). Pure numpy, no I/O.
"""

from __future__ import annotations

import numpy as np

# Query rows per block: a block's similarity matrix is rows x labeled rows float32 (512 x 20,000 is
# 40 MB), so memory stays bounded however large the slice re-scored.
_BLOCK = 512


def unit_rows(emb: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32), so a dot product is a cosine similarity."""
    e = np.asarray(emb, dtype=np.float32)
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    out: np.ndarray = e / np.maximum(norms, 1e-12)
    return out


def neighbour_proba(
    ref: np.ndarray,
    ref_y: np.ndarray,
    ref_w: np.ndarray,
    query: np.ndarray,
    p_model: np.ndarray,
    k: int,
    temperature: float,
    smoothing: float = 0.01,
) -> np.ndarray:
    """Class distribution of each query row from its k most similar reference rows.

    ref and query are unit rows (unit_rows); each neighbour votes for its label with weight
    ref_w * exp(similarity / temperature) (relative to the closest one). A class no reference row
    carries cannot be voted for, so it keeps the model's probability (`p_model`, the regression's
    distribution of the same rows, which knows it from its description); the votes share the rest,
    `smoothing` of it spread evenly over the voted-for classes so none of them is ruled out (a
    share of the whole, not per class: per class, 150 classes would blur a unanimous vote into a
    distribution ten times less sure than its neighbours are right)."""
    q = np.asarray(query, dtype=np.float32)
    p = np.asarray(p_model, dtype=np.float64)
    n_classes = p.shape[1]
    y = np.asarray(ref_y, dtype=np.int64)
    seen = np.zeros(n_classes, dtype=bool)
    seen[y] = True
    if not seen.any():
        return np.asarray(p_model, dtype=np.float32)
    votes = np.zeros((q.shape[0], n_classes), dtype=np.float64)
    kk = min(k, int(ref.shape[0]))
    w = np.asarray(ref_w, dtype=np.float64)
    for start in range(0, q.shape[0], _BLOCK):
        sims = q[start : start + _BLOCK] @ ref.T
        # The kk largest without negating a copy of the block first.
        idx = np.argpartition(sims, sims.shape[1] - kk, axis=1)[:, sims.shape[1] - kk :]
        near = np.take_along_axis(sims, idx, axis=1).astype(np.float64)
        weight = w[idx] * np.exp((near - near.max(axis=1, keepdims=True)) / temperature)
        rows = np.repeat(np.arange(start, start + sims.shape[0]), kk)
        np.add.at(votes, (rows, y[idx].ravel()), weight.ravel())
    votes /= votes.sum(axis=1, keepdims=True)
    votes[:, seen] = (1.0 - smoothing) * votes[:, seen] + smoothing / int(seen.sum())
    out = votes * (1.0 - p[:, ~seen].sum(axis=1, keepdims=True))
    out[:, ~seen] = p[:, ~seen]
    result: np.ndarray = out.astype(np.float32)
    return result


def blend(p_model: np.ndarray, p_neighbours: np.ndarray, weight: float) -> np.ndarray:
    """The two views mixed: (1 - weight) of the regression's distribution plus weight of the
    neighbours'. (A weighted geometric mean, surer where the views agree, cost more human labels
    offline on AG News and Banking77: see docs/benchmarks.md.)"""
    if weight <= 0:
        return p_model
    out: np.ndarray = ((1.0 - weight) * p_model + weight * p_neighbours).astype(np.float32)
    return out
