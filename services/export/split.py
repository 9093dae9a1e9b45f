"""Train/validation/test split of an export: stratified by label, and leak-free.

Leak-free: items whose texts are the same once normalized (case, whitespace, punctuation) land in
one split, and so do near-duplicates that differ only in digits ("order 1234 late" and "order 98
late"), since a model scored on a copy of its training text looks better than it is. Items are
grouped by that key; each group goes whole to one split. Within each label (a group counts under
its most common label) groups are shuffled with the seed and each goes to the split furthest
below its share of that label, largest groups first, so every split's label mix is close to the
whole.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

SPLIT_NAMES = ("train", "validation", "test")

_PUNCT = re.compile(r"[^\w\s]|_")
_DIGITS = re.compile(r"\d+")


@dataclass(frozen=True)
class SplitSpec:
    fractions: Mapping[str, float]  # split name → share; only positive shares are splits
    seed: int = 0

    def __post_init__(self) -> None:
        if any(name not in SPLIT_NAMES for name in self.fractions):
            raise ValueError(f"split names are {SPLIT_NAMES}")
        if any(f < 0 for f in self.fractions.values()):
            raise ValueError("split fractions must not be negative")
        if abs(sum(self.fractions.values()) - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, not {sum(self.fractions.values()):g}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n in SPLIT_NAMES if self.fractions.get(n, 0) > 0)


def normalize(text: str) -> str:
    """Lowercase, punctuation stripped, whitespace collapsed."""
    return " ".join(_PUNCT.sub("", text.lower()).split())


def group_key(text: str) -> str:
    """What near-duplicates share: the normalized text without its digits."""
    return " ".join(_DIGITS.sub(" ", normalize(text)).split())


def assign(items: Iterable[tuple[str, str, str]], spec: SplitSpec) -> dict[str, str]:
    """Split of each item, from (item_id, text, label)."""
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for item_id, text, label in items:
        groups[group_key(text)].append((item_id, label))
    strata: dict[str, list[str]] = defaultdict(list)
    for key, members in groups.items():
        counts = Counter(label for _, label in members)
        # Most common label, ties broken by name so the outcome depends on the seed alone.
        label = min(counts, key=lambda lb: (-counts[lb], lb))
        strata[label].append(key)
    names = spec.names
    rng = random.Random(spec.seed)
    out: dict[str, str] = {}
    for label in sorted(strata):
        keys = sorted(strata[label])
        rng.shuffle(keys)
        # Stable sort: largest groups placed first (they are the hard ones to balance), random
        # order among groups of one size.
        keys.sort(key=lambda k: -len(groups[k]))
        total = sum(len(groups[k]) for k in keys)
        placed: Counter[str] = Counter()
        for key in keys:
            split = max(names, key=lambda n: spec.fractions[n] * total - placed[n])
            placed[split] += len(groups[key])
            for item_id, _ in groups[key]:
                out[item_id] = split
    return out
