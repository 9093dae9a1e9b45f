"""People's labels checked against the model's, for the bound on people's own errors.

Pure domain code, no I/O. In a project whose people label blind (it hides suggestions), each
person's label is compared with the model's label for the item, fixed before the person answered
(the label the scorer last gave it; for a proposed item, the proposed label). A label that agrees
needs nothing more; one that disagrees goes to a second person, and the final label is the one two
of the three share. certification.human_errors_upper turns the counts into a bound: a person who
agrees with the model is wrong only where the model is wrong the same way, which is rare, so most
human labels no longer count as wrong at the assumed rate h.

Labels that cannot be checked count at h, as in a project that shows suggestions: a label given
with a suggestion shown (the project showed them when the task was served), an aggregate of
several people's labels, a label on an item the model had no label for, and an agreeing label a
later second look replaced (the final label then rests on the second person alone).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import islice

from services.scorer.policy.certification import MIN_CHECKED, RECENT_SHARE, HumanChecks


class Check(StrEnum):
    AGREED = "agreed"
    ASKED = "asked"  # disagreed; waiting for the second person
    SECONDED = "seconded"  # disagreed; the second person picked the first label or the model's
    SPLIT = "split"  # disagreed; the second person picked neither (counted wrong)
    PLAIN = "plain"


@dataclass
class HumanCheckBook:
    """Each human label's check, by item id."""

    blind: bool
    checks: dict[str, Check] = field(default_factory=dict)
    model_label: dict[str, int] = field(default_factory=dict)
    first_label: dict[str, int] = field(default_factory=dict)
    # Labels per check, kept as they change: the certificate reads them at every trial.
    tally: dict[Check, int] = field(default_factory=lambda: {check: 0 for check in Check})

    def _set(self, item_id: str, check: Check) -> None:
        old = self.checks.get(item_id)
        if old is not None:
            self.tally[old] -= 1
        self.checks[item_id] = check
        self.tally[check] += 1

    def record(self, item_id: str, label: int, model_label: int | None, checkable: bool = True) -> bool:
        """A person's label on an item the model labeled `model_label` before learning it;
        `checkable`: one person's label, given blind. Returns True when it disagrees: the caller
        asks a second person (record_second settles it). A label recorded before (a redelivery)
        changes nothing."""
        if item_id in self.checks:
            return False
        if not self.blind or model_label is None or not checkable:
            self._set(item_id, Check.PLAIN)
            return False
        self.model_label[item_id] = model_label
        self.first_label[item_id] = label
        self._set(item_id, Check.AGREED if label == model_label else Check.ASKED)
        return label != model_label

    def record_second(self, item_id: str, label: int) -> None:
        """A second person's label. Only a disagreement waiting for it is settled by it."""
        if self.checks.get(item_id) is not Check.ASKED:
            return
        sides = (self.first_label[item_id], self.model_label[item_id])
        self._set(item_id, Check.SECONDED if label in sides else Check.SPLIT)

    def replaced(self, item_id: str) -> None:
        """A second look replaced an agreeing label: the final label rests on one person."""
        if self.checks.get(item_id) is Check.AGREED:
            self._set(item_id, Check.PLAIN)

    def checked_against(self, item_ids: list[str]) -> list[tuple[str, int]]:
        """(item id, the model's label) of those labels that were checked."""
        return [(i, self.model_label[i]) for i in item_ids if i in self.model_label]

    def counts(self) -> HumanChecks:
        """Every label's check, and the latest labels' (RECENT_SHARE of them, at least MIN_CHECKED;
        `checks` keeps the order labels first came in) for projecting the ones still to come."""
        latest = max(MIN_CHECKED, int(RECENT_SHARE * len(self.checks)))
        if len(self.checks) <= latest:
            return _counts(self.tally)
        return _counts(self.tally, _counts(Counter(islice(reversed(self.checks.values()), latest))))


def _counts(tally: Mapping[Check, int], recent: HumanChecks | None = None) -> HumanChecks:
    return HumanChecks(
        agreed=tally[Check.AGREED],
        disagreed=tally[Check.ASKED] + tally[Check.SECONDED] + tally[Check.SPLIT],
        seconded=tally[Check.SECONDED] + tally[Check.SPLIT],
        split=tally[Check.SPLIT],
        plain=tally[Check.PLAIN],
        recent=recent,
    )
