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
  chi-square test of the slice against the rest of the rows.

Flags: `accuracy_below_target` when the audited-accuracy interval lies wholly below the target
(with no audits in the slice, the model–people agreement interval instead); `distribution_drift`
when the distance is above 0.1 and p < 0.01 (never without a p-value).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

NONE = "(none)"
AUDIT_REASON = "audit"
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

    def add(self, row: Mapping[str, Any]) -> None:
        self.items += 1
        self.labels[str(row.get("label", ""))] += 1
        source = row.get("source")
        self.auto += source == "auto"
        self.human += source in HUMAN_SOURCES
        raw: Sequence[Mapping[str, Any]] = row.get("raw_labels") or []
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
    acc: _Acc, name: str, value: str, whole: Mapping[str, int], target: float, *, reference: bool
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
    )


def build_report(
    rows: Iterable[Mapping[str, Any]],
    slice_fields: Sequence[str],
    target_accuracy: float,
    project_id: str = "",
) -> QualityReport:
    if not slice_fields:
        raise ValueError("name at least one slice field")
    overall = _Acc()
    per: dict[str, defaultdict[str, _Acc]] = {name: defaultdict(_Acc) for name in slice_fields}
    for row in rows:
        overall.add(row)
        for name, accs in per.items():
            accs[slice_value(row, name)].add(row)
    whole = overall.labels
    return QualityReport(
        project_id=project_id,
        target_accuracy=target_accuracy,
        slice_fields=tuple(per),
        overall=_report(overall, "", "(all)", whole, target_accuracy, reference=True),
        slices=tuple(
            _report(accs[value], name, value, whole, target_accuracy, reference=False)
            for name, accs in per.items()
            for value in sorted(accs)
        ),
    )
