"""The human budget: how many items people may label. One rule for the scorer and the harness."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class HumanBudget:
    """A cap on human labels: a share of the items seen and/or a count (0 = no such cap); the
    tighter one wins. A share never rounds up: a 3% budget of 1,001 items is 30 labels."""

    count: int = 0
    share: float = 0.0

    @property
    def limited(self) -> bool:
        return self.count > 0 or self.share > 0

    def limit(self, seen: int) -> int | None:
        """Items people may label once `seen` items arrived; None when there is no budget."""
        caps = []
        if self.count > 0:
            caps.append(self.count)
        if self.share > 0:
            caps.append(math.floor(self.share * seen + 1e-9))
        return min(caps) if caps else None

    def spent(self, labels: int, seen: int) -> bool:
        cap = self.limit(seen)
        return cap is not None and labels >= cap
