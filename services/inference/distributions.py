"""From per-label log-likelihoods to the label distribution every backend must emit.

Whatever a model answers (a log-probability per label, some labels missing, -inf, NaN), the
result is a valid distribution over the project's labels: finite, non-negative, summing to 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# A label the model gave no log-probability for is treated as this unlikely, not impossible:
# the scorer must still be able to send such an item to people.
FLOOR_LOGPROB = -30.0


def mean_logprob(token_logprobs: Sequence[float]) -> float:
    """Length-normalised log-likelihood of a label's tokens, so long names are not penalised."""
    if not token_logprobs:
        return FLOOR_LOGPROB
    return float(sum(token_logprobs)) / len(token_logprobs)


def normalise(scores: Sequence[float | None]) -> np.ndarray:
    """softmax over the labels' log-scores; missing or non-finite scores count as the floor."""
    z = np.array(
        [s if s is not None and math.isfinite(s) else FLOOR_LOGPROB for s in scores], dtype=np.float64
    )
    if z.size == 0:
        return np.zeros(0, dtype=np.float32)
    z = np.maximum(z, FLOOR_LOGPROB)
    z -= z.max()
    e = np.exp(z)
    p = e / e.sum()
    out: np.ndarray = p.astype(np.float32)
    # float32 rounding can leave the sum a hair off 1; the contract says rows sum to 1.
    out /= out.sum()
    return out
