"""The order in which people get the items nobody has decided yet.

Pure numpy, no I/O. Items are never accepted on arrival: acceptance goes through proposals and their
certificate (proposals.py). People's queue is a random sample for the first labels (so the first
model sees the whole range of items), then ambiguous-first (smallest margin between the model's two
likeliest labels: the labels that teach it most).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Priorities: ambiguity lies in [0, 1]; audits, second opinions and the control arm come first
# because a proposal's acceptance waits on its audits.
AUDIT_PRIORITY = 1.0
# Items of a batch the audits refuted: right after audits (see proposals.ProposalBook.settle).
HANDED_BACK_PRIORITY = 0.99


def margin(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability per row (1.0 when there is a single class)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.shape[1] < 2:
        return np.ones(p.shape[0], dtype=np.float64)
    top2 = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def confidence_of(probs: np.ndarray) -> np.ndarray:
    """The model's probability of its own label."""
    out: np.ndarray = np.asarray(probs, dtype=np.float64).max(axis=1)
    return out


@dataclass(frozen=True)
class Routing:
    label: np.ndarray
    confidence: np.ndarray
    priority: np.ndarray  # higher = served first
    warmup: bool  # True while the queue is still a random sample


def route(probs: np.ndarray, draws: np.ndarray, n_labels: int, warmup_labels: int) -> Routing:
    """People's order: by the item's fixed random draw until `warmup_labels` labels exist, then
    ambiguous-first (ties broken by the draw, scaled far below any real margin difference)."""
    p = np.asarray(probs, dtype=np.float64)
    u = np.asarray(draws, dtype=np.float64).reshape(-1)
    if u.shape[0] != p.shape[0]:
        raise ValueError("need one draw per row")
    labels = p.argmax(axis=1)
    conf = confidence_of(p)
    if n_labels < warmup_labels:
        return Routing(labels, conf, u, True)
    return Routing(labels, conf, 1.0 - margin(p) + 1e-9 * u, False)
