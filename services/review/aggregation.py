"""Label aggregation and agreement: several people's judgments of an item → one label. No I/O.

Majority vote counts every judgment the same. Dawid–Skene (A. P. Dawid and A. M. Skene,
"Maximum Likelihood Estimation of Observer Error-Rates Using the EM Algorithm", Applied
Statistics 28(1), 1979, 20–28) learns, with EM, one confusion matrix per annotator (the chance
they answer each label given each true label) and the class priors, and weighs every judgment by
it: it learns who to trust. A careful annotator outvotes two careless ones, a spammer's votes
carry almost nothing, and a systematic confusion ("calls Neutral Positive") is read back. It
beats majority vote when annotators differ in quality and each has judged enough items, on
enough items with overlap, for their matrix to be estimated; on a handful of items the
matrices are noise and majority vote is the safer rule. `aggregate` and `fit_if_enough` choose.

The EM is crowd-kit's (D. Ustalov, N. Pavlichenko, B. Tseitlin, "Learning from Crowds with
Crowd-Kit", JOSS 9(96), 6227, 2024), with one change: a Dirichlet prior on each confusion matrix
(see `_SmoothedDawidSkene`). The fitted model is kept as plain numpy arrays in the project's
label order, so the review service can settle a newly completed item with one E-step
(`DawidSkeneModel.posterior`) without refitting.

Conventions: one judgment per (item, annotator); a repeated one replaces the earlier one.
`confusions[a, true, observed]` = P(annotator a answers `observed` | the item is `true`); each
row sums to 1.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import combinations
from typing import Any

import krippendorff
import numpy as np
import numpy.typing as npt
import pandas as pd
from crowdkit.aggregation import DawidSkene
from sklearn.metrics import cohen_kappa_score

Array = npt.NDArray[np.float64]

MAJORITY_VOTE = "majority_vote"
DAWID_SKENE = "dawid_skene"

# Dawid–Skene needs overlap to learn anything: an item judged once says nothing about its
# annotator. With too few overlapped items the matrices are mostly prior and EM's
# self-confirmation (an annotator's own vote shapes the posterior that grades them) makes DS
# slightly worse than majority vote. Measured at overlap 3 (docs/workforce.md): a five-person
# synthetic crowd crosses over at ~20 items, the 102-worker weather-sentiment crowd (few
# judgments each) at ~55. 50 sits near the sparse crowd's crossover, where DS loses at most
# about a point, and a small team gives up little by waiting for it.
MIN_ITEMS_FOR_DS = 50

# Keeps log() finite for a probability the model rounds to zero (crowd-kit uses the same floor).
_FLOOR = 1e-10


@dataclass(frozen=True)
class Judgment:
    item_id: str
    annotator_id: str
    label: str


@dataclass(frozen=True)
class Aggregate:
    label: str
    posterior: float  # the chosen label's probability (majority vote: its vote share)
    method: str  # MAJORITY_VOTE or DAWID_SKENE


@dataclass(frozen=True)
class PairKappa:
    a: str
    b: str
    kappa: float  # NaN when undefined (both gave one and the same label throughout)
    items: int  # items both labeled


@dataclass(frozen=True)
class Rate:
    value: float
    low: float
    high: float
    n: int


def latest(judgments: Iterable[Judgment]) -> list[Judgment]:
    """One judgment per (item, annotator), the last one given, in first-seen order."""
    by_key: dict[tuple[str, str], Judgment] = {}
    for j in judgments:
        by_key[(j.item_id, j.annotator_id)] = j
    return list(by_key.values())


# --- majority vote -------------------------------------------------------------------------


def majority_vote(judgments: Iterable[Judgment], labels: Sequence[str] | None = None) -> dict[str, Aggregate]:
    """The most frequent label of each item; posterior = its vote share.

    A tie goes to the tied label that comes first in `labels` (the project's label order), or,
    without `labels`, to the alphabetically smallest: deterministic, so a refit or a replay gives
    the same answer whatever order the judgments arrived in.
    """
    votes: dict[str, Counter[str]] = {}
    for j in latest(judgments):
        votes.setdefault(j.item_id, Counter())[j.label] += 1
    rank = {label: i for i, label in enumerate(labels or ())}

    def tie_order(label: str) -> tuple[int, str]:
        return rank.get(label, len(rank)), label

    result: dict[str, Aggregate] = {}
    for item_id, counts in votes.items():
        top = max(counts.values())
        label = min((lb for lb, n in counts.items() if n == top), key=tie_order)
        result[item_id] = Aggregate(label, top / sum(counts.values()), MAJORITY_VOTE)
    return result


# --- Dawid–Skene ---------------------------------------------------------------------------


class _SmoothedDawidSkene(DawidSkene):
    """crowd-kit's Dawid–Skene EM with a Dirichlet prior on every annotator's confusion matrix.

    Plain maximum likelihood believes small samples: an annotator seen on three items who agreed
    with the consensus each time gets a perfect matrix and then outvotes everyone, and one who
    used two labels once each is "certain" of both. Each M-step therefore adds `pseudo_count`
    pseudo-judgments per true label, spread as an annotator of the crowd's current average
    accuracy would give them (right with probability `accuracy`, otherwise uniformly wrong). A
    prolific annotator's own counts swamp the prior; a newcomer starts near the crowd average.
    This is a MAP estimate; on the weather-sentiment crowd it is worth 5-8 points of accuracy at
    overlap 3-5 over crowd-kit's unsmoothed fit (docs/workforce.md).

    crowd-kit 1.4.2 (pinned) has no such option; `_m_step` is where its `fit` computes the
    matrices (the initial and every later M-step), so this override is the whole change.
    """

    def __init__(self, labels: Sequence[str], n_iter: int, pseudo_count: float) -> None:
        super().__init__(n_iter=n_iter)
        self.project_labels = list(labels)
        self.pseudo_count = pseudo_count
        self.average_accuracy = 1.0 / len(labels)

    # A static method upstream; crowd-kit calls it as `self._m_step(...)`, so a method works.
    def _m_step(  # type: ignore[override]
        self,
        data: pd.DataFrame,
        probas: pd.DataFrame,
        initial_error: pd.DataFrame | None = None,
        initial_error_strategy: Any = None,
    ) -> pd.DataFrame:
        # Expected counts: rows (worker, observed label), columns the true labels in the fit.
        counts = data.join(probas, on="task").drop(columns=["task"]).groupby(["worker", "label"]).sum()
        workers = counts.index.unique(level="worker")
        # Every project label as an observed row, so the matrices cover answers not seen yet.
        rows = pd.MultiIndex.from_product([workers, self.project_labels], names=["worker", "label"])
        counts = counts.reindex(rows, fill_value=0.0)
        true_labels = [str(c) for c in counts.columns]
        k = len(self.project_labels)
        cube = counts.to_numpy(dtype=np.float64).reshape(len(workers), k, len(true_labels))
        right = np.array([[o == t for t in true_labels] for o in self.project_labels])  # (observed, true)
        total = cube.sum()
        self.average_accuracy = float(cube[:, right].sum() / total) if total > 0 else 1.0 / k
        pseudo = np.where(right, self.average_accuracy, (1.0 - self.average_accuracy) / (k - 1))
        cube = cube + self.pseudo_count * pseudo
        cube = cube / cube.sum(axis=1, keepdims=True)
        return pd.DataFrame(cube.reshape(len(rows), len(true_labels)), index=rows, columns=counts.columns)


@dataclass(frozen=True, eq=False)
class DawidSkeneModel:
    """A fitted Dawid–Skene model in the project's label order (arrays are read-only)."""

    labels: tuple[str, ...]
    annotators: tuple[str, ...]
    confusions: Array  # (annotator, true, observed)
    average_confusion: Array  # (true, observed): judgment-weighted mean, for unseen annotators
    priors: Array  # (label,)
    items: tuple[str, ...]
    posteriors: Array  # (item, label): the fit's posterior of every item it saw
    iterations: int

    def __post_init__(self) -> None:
        for array in (self.confusions, self.average_confusion, self.priors, self.posteriors):
            array.flags.writeable = False

    @cached_property
    def _annotator_index(self) -> dict[str, int]:
        return {a: i for i, a in enumerate(self.annotators)}

    @cached_property
    def _label_index(self) -> dict[str, int]:
        return {lb: i for i, lb in enumerate(self.labels)}

    def posterior(self, item_judgments: Sequence[tuple[str, str]]) -> Array:
        """P(true label) of one item from its (annotator_id, label) judgments: one E-step with the
        fitted matrices. An annotator the model has not seen gets the average matrix."""
        unseen = len(self.annotators)  # the row of the average matrix in `_e_step`'s stack
        annotators = np.array([self._annotator_index.get(a, unseen) for a, _ in item_judgments], dtype=int)
        observed = np.array([_index_of(self._label_index, lb) for _, lb in item_judgments], dtype=int)
        confusions = np.concatenate([self.confusions, self.average_confusion[None]])
        items = np.zeros(len(item_judgments), dtype=int)
        posterior: Array = _e_step(self.priors, confusions, items, annotators, observed, 1)[0]
        return posterior

    def annotator_accuracy(self) -> dict[str, float]:
        """Each annotator's expected accuracy under the class priors: Σ_c prior_c · P(c | c)."""
        diagonals = np.diagonal(self.confusions, axis1=1, axis2=2)
        return {a: float(diagonals[i] @ self.priors) for i, a in enumerate(self.annotators)}

    def aggregates(self) -> dict[str, Aggregate]:
        """The most probable label of every item of the fit (ties: the earlier label)."""
        best = self.posteriors.argmax(axis=1)
        return {
            item_id: Aggregate(self.labels[k], float(self.posteriors[i, k]), DAWID_SKENE)
            for i, (item_id, k) in enumerate(zip(self.items, best, strict=True))
        }


def fit_dawid_skene(
    judgments: Iterable[Judgment],
    labels: Sequence[str],
    n_iter: int = 100,
    pseudo_count: float | None = None,
) -> DawidSkeneModel:
    """Fit Dawid–Skene (crowd-kit's EM, smoothed) on the judgments.

    `labels` is the project's label order, which the model's arrays follow. `pseudo_count` is
    the prior's weight in judgments per true label; by default the number of labels, about one
    pseudo-judgment per cell of a matrix, so a column is the annotator's own only once they have
    judged several items of that class.
    """
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ValueError(f"need at least two distinct labels, got {list(labels)}")
    rows = latest(judgments)
    if not rows:
        raise ValueError("no judgments to fit")
    label_index = {lb: i for i, lb in enumerate(labels)}
    observed = np.array([_index_of(label_index, j.label) for j in rows], dtype=int)

    ds = _SmoothedDawidSkene(labels, n_iter, float(len(labels)) if pseudo_count is None else pseudo_count)
    frame = pd.DataFrame(
        {
            "task": [j.item_id for j in rows],
            "worker": [j.annotator_id for j in rows],
            "label": [j.label for j in rows],
        }
    )
    ds.fit(frame)

    k = len(labels)
    # Rows for labels no one chose in the fit: the smoothing prior alone (crowd-kit only fits
    # the labels present in the data).
    prior_row = np.full(k, (1.0 - ds.average_accuracy) / (k - 1))
    errors: pd.DataFrame = ds.errors_
    annotators = tuple(sorted(errors.index.unique(level="worker")))
    confusions = np.empty((len(annotators), k, k))
    for true, label in enumerate(labels):
        if label in errors.columns:
            column = errors[label].unstack("label").reindex(index=list(annotators), columns=list(labels))
            confusions[:, true, :] = column.to_numpy(dtype=np.float64)
        else:
            confusions[:, true, :] = prior_row
            confusions[:, true, true] = ds.average_accuracy

    # One pseudo-item per label: a label nobody chose yet is rare, not impossible, and
    # `posterior` must still be able to pick it for a new item.
    assert ds.priors_ is not None, "crowd-kit sets priors_ in fit"
    fitted_priors = ds.priors_.reindex(list(labels), fill_value=0.0).to_numpy(dtype=np.float64)
    items = tuple(dict.fromkeys(j.item_id for j in rows))
    priors = (fitted_priors * len(items) + 1.0) / (len(items) + k)

    annotator_index = {a: i for i, a in enumerate(annotators)}
    item_index = {item_id: i for i, item_id in enumerate(items)}
    annotator_of = np.array([annotator_index[j.annotator_id] for j in rows], dtype=int)
    weights = np.bincount(annotator_of, minlength=len(annotators)).astype(np.float64)
    average = np.einsum("a,atc->tc", weights, confusions) / weights.sum()
    item_of = np.array([item_index[j.item_id] for j in rows], dtype=int)
    # The posteriors again from the final matrices and smoothed priors, so `posterior()` of a
    # fitted item's judgments gives exactly the fit's answer.
    posteriors = _e_step(priors, confusions, item_of, annotator_of, observed, len(items))
    return DawidSkeneModel(
        labels=tuple(labels),
        annotators=annotators,
        confusions=confusions,
        average_confusion=average,
        priors=priors,
        items=items,
        posteriors=posteriors,
        iterations=len(ds.loss_history_),
    )


def overlapped_items(judgments: Iterable[Judgment]) -> int:
    """Items with at least two judgments (the ones that teach Dawid–Skene anything)."""
    per_item = Counter(j.item_id for j in latest(judgments))
    return sum(1 for n in per_item.values() if n >= 2)


def fit_if_enough(
    judgments: Sequence[Judgment], labels: Sequence[str], min_items: int = MIN_ITEMS_FOR_DS
) -> DawidSkeneModel | None:
    """A Dawid–Skene model when at least `min_items` items have two or more judgments, else None
    (the caller falls back to majority vote)."""
    if overlapped_items(judgments) < min_items:
        return None
    return fit_dawid_skene(judgments, labels)


def aggregate(
    judgments: Iterable[Judgment], labels: Sequence[str], min_items_for_ds: int = MIN_ITEMS_FOR_DS
) -> tuple[dict[str, Aggregate], str]:
    """Every item's label, and the method: Dawid–Skene with enough overlap, else majority vote."""
    rows = latest(judgments)
    model = fit_if_enough(rows, labels, min_items_for_ds)
    if model is None:
        return majority_vote(rows, labels), MAJORITY_VOTE
    return model.aggregates(), DAWID_SKENE


def _index_of(index: Mapping[str, int], label: str) -> int:
    try:
        return index[label]
    except KeyError:
        raise ValueError(f"label {label!r} is not one of the project's labels {list(index)}") from None


def _e_step(
    priors: Array,
    confusions: Array,
    items: npt.NDArray[np.int_],
    annotators: npt.NDArray[np.int_],
    observed: npt.NDArray[np.int_],
    n_items: int,
) -> Array:
    """P(true label | judgments) for each item: priors × Π P(observed | true), in log space
    because a product of many small probabilities underflows."""
    log_confusions = np.log(np.clip(confusions, _FLOOR, None))
    log_post = np.tile(np.log(np.clip(priors, _FLOOR, None)), (n_items, 1))
    np.add.at(log_post, items, log_confusions[annotators, :, observed])
    log_post -= log_post.max(axis=1, keepdims=True)
    post = np.exp(log_post)
    result: Array = post / post.sum(axis=1, keepdims=True)
    return result


# --- agreement -----------------------------------------------------------------------------


def krippendorff_alpha(judgments: Iterable[Judgment], labels: Sequence[str]) -> float:
    """Krippendorff's alpha (nominal) over all items with two or more judgments: 1 is perfect
    agreement, 0 what chance gives. NaN when undefined: no item with two judgments, or a single
    label used throughout (no disagreement to expect)."""
    label_index = {lb: i for i, lb in enumerate(labels)}
    rows = latest(judgments)
    items = {item_id: i for i, item_id in enumerate(dict.fromkeys(j.item_id for j in rows))}
    counts = np.zeros((len(items), len(labels)))
    for j in rows:
        counts[items[j.item_id], _index_of(label_index, j.label)] += 1
    counts = counts[counts.sum(axis=1) >= 2]
    if len(counts) == 0 or np.count_nonzero(counts.sum(axis=0)) < 2:
        return math.nan
    return float(krippendorff.alpha(value_counts=counts, level_of_measurement="nominal"))


def pairwise_kappa(judgments: Iterable[Judgment], min_items: int = 10) -> list[PairKappa]:
    """Cohen's kappa of every pair of annotators who both labeled at least `min_items` items,
    on those items; pairs sorted by annotator id. Fewer shared items would make kappa noise."""
    by_annotator: dict[str, dict[str, str]] = {}
    for j in latest(judgments):
        by_annotator.setdefault(j.annotator_id, {})[j.item_id] = j.label
    pairs: list[PairKappa] = []
    for a, b in combinations(sorted(by_annotator), 2):
        shared = sorted(by_annotator[a].keys() & by_annotator[b].keys())
        if len(shared) < max(min_items, 1):
            continue
        labels_a = [by_annotator[a][i] for i in shared]
        labels_b = [by_annotator[b][i] for i in shared]
        if len(set(labels_a) | set(labels_b)) == 1:
            kappa = math.nan  # chance agreement is 1: kappa is 0/0
        else:
            kappa = float(cohen_kappa_score(labels_a, labels_b))
        pairs.append(PairKappa(a, b, kappa, len(shared)))
    return pairs


def wilson(successes: int, n: int, z: float = 1.96) -> Rate:
    """A rate with its Wilson score interval (all zeros for n = 0)."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return Rate(0.0, 0.0, 0.0, 0)
    p, z2 = successes / n, z * z
    centre, spread = p + z2 / (2 * n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return Rate(p, max(0.0, (centre - spread) / (1 + z2 / n)), min(1.0, (centre + spread) / (1 + z2 / n)), n)
