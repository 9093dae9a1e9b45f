"""Quality and fairness of an export, per slice of the items (a metadata field's values).

Pure: export rows (the JSONL line as a dict) in, dataclasses out; rendering is in report_html.
One pass over the rows, keeping only counts per slice value, so a large export is not held.

For every value of every slice field (and "(none)" for rows without it), and for the whole
project as the reference:
- items, the label distribution, the share accepted automatically and the share labeled by people;
- audited accuracy: among audits (raw labels with reason "audit" that carry the model's label),
  the share where the person's label equals the model's, with a 95% Wilson interval;
- model–people agreement: the same over every raw label that carries the model's label (audits
  and the uncertain items people were sent, so it understates the accuracy of automatic labels);
- people agreement: over items with two or more raw labels, the share of pairs of people agreeing;
- drift: total variation distance between the slice's label distribution and the whole's, and a
  chi-square test of the slice against the rest of the rows;
- audit share: items audited (a raw label with reason "audit") among those and the items accepted
  automatically (final source "auto"), an item counted once; None when there are neither;
- label-error review: items with a raw label of reason "label_error" (a second look at a human label
  the model contradicted with confidence), each with its outcome: "corrected" when the final label
  is the model's and not the one first given, "kept" when it is the one first given, else "other".
  Counts per slice and overall; the candidates themselves are listed overall only, the first
  MAX_CANDIDATES of them (the counts stay exact), so memory stays bounded;
- since when the scorer audits the slice more (`audit_raised`, passed in: the report cannot know).

Flags: `accuracy_below_target` when the audited-accuracy interval lies wholly below the target
(with no audits in the slice, the model–people agreement interval instead); `distribution_drift`
when the distance is above 0.1 and p < 0.01 (never without a p-value).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

NONE = "(none)"
AUDIT_REASON = "audit"
LABEL_ERROR_REASON = "label_error"
# The report is kept whole in memory and shipped as one JSON document: the list must stay bounded.
MAX_CANDIDATES = 500
TEXT_CHARS = 200
CORRECTED, KEPT, OTHER = "corrected", "kept", "other"
DRIFT_DISTANCE = 0.1
DRIFT_P = 0.01
_Z95 = 1.959963984540054
HUMAN_SOURCES = frozenset({"human", "consensus", "gold"})


@dataclass(frozen=True)
class Rate:
    """successes of n, with a 95% Wilson interval (0..1 when n is 0: nothing is known)."""

    successes: int
    n: int
    estimate: float | None
    low: float
    high: float


@dataclass(frozen=True)
class PairAgreement:
    """Pairs of people labeling one item alike. No interval: pairs on one item are not independent."""

    agreeing: int
    pairs: int
    items: int
    share: float | None


@dataclass(frozen=True)
class LabelErrorCounts:
    """Items that had a label-error review, by outcome (every candidate counts as reviewed)."""

    candidates: int = 0
    corrected: int = 0
    kept: int = 0
    other: int = 0


@dataclass(frozen=True)
class LabelErrorCandidate:
    id: str  # the item's external id
    item_id: str
    text: str  # the first TEXT_CHARS characters
    given_label: str  # the earliest raw label that was not itself a label-error review ("" if none)
    model_label: str  # what the model said instead, with its confidence, as the review task carried
    model_confidence: float
    second_label: str  # the reviewer's label
    final_label: str
    outcome: str  # CORRECTED | KEPT | OTHER


@dataclass(frozen=True)
class SliceReport:
    field: str  # "" for the whole project
    value: str
    items: int
    labels: dict[str, int]
    auto_share: float
    human_share: float
    audited_accuracy: Rate
    model_agreement: Rate
    people_agreement: PairAgreement
    drift_distance: float
    drift_p: float | None
    accuracy_below_target: bool
    distribution_drift: bool
    audit_share: float | None = None
    # `field` is a column of this class, hence the module's name for the function.
    label_errors: LabelErrorCounts = dataclasses.field(default_factory=LabelErrorCounts)
    audit_raised_since_unix_ms: int = 0  # 0: the scorer does not audit this slice more

    @property
    def flagged(self) -> bool:
        return self.accuracy_below_target or self.distribution_drift


@dataclass(frozen=True)
class QualityReport:
    project_id: str
    target_accuracy: float
    slice_fields: tuple[str, ...]
    overall: SliceReport
    slices: tuple[SliceReport, ...]  # by field (in the order asked), then by value
    label_errors: LabelErrorCounts = field(default_factory=LabelErrorCounts)
    label_error_candidates: tuple[LabelErrorCandidate, ...] = ()  # the first MAX_CANDIDATES

    def by_field(self, name: str) -> list[SliceReport]:
        return [s for s in self.slices if s.field == name]


def wilson(successes: int, n: int, z: float = _Z95) -> Rate:
    # Wilson rather than the normal approximation: it stays inside 0..1 and is sensible at the
    # small n (a handful of audits in a slice) this report meets most.
    if n == 0:
        return Rate(0, 0, None, 0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Rate(successes, n, p, max(0.0, centre - half), min(1.0, centre + half))


def slice_value(row: Mapping[str, Any], name: str) -> str:
    value = (row.get("metadata") or {}).get(name)
    if value is None or value == "":
        return NONE
    return value if isinstance(value, str) else str(value)


def _outcome(given: str, model: str, final: str) -> str:
    if final == model and final != given:
        return CORRECTED
    return KEPT if final == given else OTHER


def label_error_candidate(row: Mapping[str, Any]) -> LabelErrorCandidate | None:
    """The item's label-error review, or None when it had none. With several reviews the earliest
    one speaks for the model (they carry the same prediction)."""
    raw: Sequence[Mapping[str, Any]] = row.get("raw_labels") or []
    if not any(r.get("reason") == LABEL_ERROR_REASON for r in raw):
        return None
    # The export lists raw labels by time already; sorting again costs little and keeps this
    # right for rows built elsewhere. ISO times of one export share a format, so text order holds.
    ordered = sorted(raw, key=lambda r: str(r.get("labeled_at") or ""))
    review = next(r for r in ordered if r.get("reason") == LABEL_ERROR_REASON)
    given = next((str(r.get("label", "")) for r in ordered if r.get("reason") != LABEL_ERROR_REASON), "")
    model = str(review.get("model_label") or "")
    final = str(row.get("label", ""))
    return LabelErrorCandidate(
        id=str(row.get("id", "")),
        item_id=str(row.get("item_id", "")),
        text=str(row.get("text") or "")[:TEXT_CHARS],
        given_label=given,
        model_label=model,
        model_confidence=float(review.get("model_confidence") or 0.0),
        second_label=str(review.get("label", "")),
        final_label=final,
        outcome=_outcome(given, model, final),
    )


@dataclass
class _Acc:
    items: int = 0
    labels: Counter[str] = field(default_factory=Counter)
    auto: int = 0
    human: int = 0
    audits: int = 0
    audits_agreeing: int = 0
    with_model: int = 0
    with_model_agreeing: int = 0
    pairs: int = 0
    pairs_agreeing: int = 0
    items_with_pairs: int = 0
    audited_or_auto: int = 0
    audited_items: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)

    def add(self, row: Mapping[str, Any], review: LabelErrorCandidate | None) -> None:
        self.items += 1
        self.labels[str(row.get("label", ""))] += 1
        source = row.get("source")
        self.auto += source == "auto"
        self.human += source in HUMAN_SOURCES
        raw: Sequence[Mapping[str, Any]] = row.get("raw_labels") or []
        # An audited item may still end "auto" (the auditor agreed): count it once in the base.
        audited = any(r.get("reason") == AUDIT_REASON for r in raw)
        self.audited_items += audited
        self.audited_or_auto += audited or source == "auto"
        if review is not None:
            self.outcomes[review.outcome] += 1
        for r in raw:
            model = r.get("model_label") or ""
            if not model:
                continue
            agrees = r.get("label") == model
            self.with_model += 1
            self.with_model_agreeing += agrees
            if r.get("reason") == AUDIT_REASON:
                self.audits += 1
                self.audits_agreeing += agrees
        # A person labeling an item twice (an audit, then overlap) is no agreement between people.
        pairs = [(a, b) for a, b in combinations(raw, 2) if a.get("annotator_id") != b.get("annotator_id")]
        if pairs:
            self.items_with_pairs += 1
            self.pairs += len(pairs)
            self.pairs_agreeing += sum(a.get("label") == b.get("label") for a, b in pairs)


def _tv_distance(part: Mapping[str, int], whole: Mapping[str, int]) -> float:
    n_part, n_whole = sum(part.values()), sum(whole.values())
    if n_part == 0 or n_whole == 0:
        return 0.0
    return 0.5 * sum(abs(part.get(k, 0) / n_part - whole.get(k, 0) / n_whole) for k in whole.keys() | part)


def _chi_square_p(part: Mapping[str, int], whole: Mapping[str, int]) -> float | None:
    """p-value of the slice's labels against the rest's (not the whole's, which contains the slice
    and would understate the difference); None when there is nothing to test or no scipy."""
    try:
        from scipy.stats import chi2_contingency
    except ImportError:  # scipy comes with scikit-learn; without it the drift flag stays off
        return None
    labels = sorted(k for k in whole if whole[k] > 0)
    inside = [part.get(k, 0) for k in labels]
    rest = [whole[k] - part.get(k, 0) for k in labels]
    if len(labels) < 2 or sum(inside) == 0 or sum(rest) == 0:
        return None
    result = chi2_contingency([inside, rest])
    return float(result.pvalue)


def _below_target(audited: Rate, agreement: Rate, target: float) -> bool:
    # Only when the whole interval is below the target: a slice with few audits is not flagged
    # on a low estimate alone.
    basis = audited if audited.n else agreement
    return basis.n > 0 and basis.high < target


def _report(
    acc: _Acc,
    name: str,
    value: str,
    whole: Mapping[str, int],
    target: float,
    *,
    reference: bool,
    raised_since: int = 0,
) -> SliceReport:
    audited = wilson(acc.audits_agreeing, acc.audits)
    agreement = wilson(acc.with_model_agreeing, acc.with_model)
    distance = 0.0 if reference else _tv_distance(acc.labels, whole)
    p = None if reference else _chi_square_p(acc.labels, whole)
    return SliceReport(
        field=name,
        value=value,
        items=acc.items,
        labels=dict(sorted(acc.labels.items())),
        auto_share=acc.auto / acc.items if acc.items else 0.0,
        human_share=acc.human / acc.items if acc.items else 0.0,
        audited_accuracy=audited,
        model_agreement=agreement,
        people_agreement=PairAgreement(
            acc.pairs_agreeing,
            acc.pairs,
            acc.items_with_pairs,
            acc.pairs_agreeing / acc.pairs if acc.pairs else None,
        ),
        drift_distance=distance,
        drift_p=p,
        accuracy_below_target=_below_target(audited, agreement, target),
        distribution_drift=p is not None and distance > DRIFT_DISTANCE and p < DRIFT_P,
        audit_share=acc.audited_items / acc.audited_or_auto if acc.audited_or_auto else None,
        label_errors=_counts(acc.outcomes),
        audit_raised_since_unix_ms=raised_since,
    )


def _counts(outcomes: Counter[str]) -> LabelErrorCounts:
    return LabelErrorCounts(
        candidates=sum(outcomes.values()),
        corrected=outcomes[CORRECTED],
        kept=outcomes[KEPT],
        other=outcomes[OTHER],
    )


def build_report(
    rows: Iterable[Mapping[str, Any]],
    slice_fields: Sequence[str],
    target_accuracy: float,
    project_id: str = "",
    audit_raised: Mapping[tuple[str, str], int] | None = None,
) -> QualityReport:
    """`audit_raised`: (field, value) → since when (unix ms) the scorer audits that slice more."""
    if not slice_fields:
        raise ValueError("name at least one slice field")
    raised = audit_raised or {}
    overall = _Acc()
    per: dict[str, defaultdict[str, _Acc]] = {name: defaultdict(_Acc) for name in slice_fields}
    candidates: list[LabelErrorCandidate] = []
    for row in rows:
        review = label_error_candidate(row)
        if review is not None and len(candidates) < MAX_CANDIDATES:
            candidates.append(review)
        overall.add(row, review)
        for name, accs in per.items():
            accs[slice_value(row, name)].add(row, review)
    whole = overall.labels
    return QualityReport(
        project_id=project_id,
        target_accuracy=target_accuracy,
        slice_fields=tuple(per),
        overall=_report(overall, "", "(all)", whole, target_accuracy, reference=True),
        slices=tuple(
            _report(
                accs[value],
                name,
                value,
                whole,
                target_accuracy,
                reference=False,
                raised_since=raised.get((name, value), 0),
            )
            for name, accs in per.items()
            for value in sorted(accs)
        ),
        label_errors=_counts(overall.outcomes),
        label_error_candidates=tuple(candidates),
    )
