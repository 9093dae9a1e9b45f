""" "My progress today": labels and time per label, per person, counted as the app submits them.

Kept in the app's memory (a restart or another replica starts from zero): it is a motivation
aid for the person at the screen, not a record; the review service holds the real one.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass


@dataclass
class Day:
    date: datetime.date
    labels: int = 0
    skips: int = 0
    seconds: float = 0.0

    @property
    def seconds_per_item(self) -> float:
        return self.seconds / self.labels if self.labels else 0.0

    def as_json(self) -> dict[str, float | int]:
        return {
            "labels": self.labels,
            "skips": self.skips,
            "seconds_per_item": round(self.seconds_per_item, 1),
        }


class Progress:
    def __init__(self) -> None:
        self._days: dict[str, Day] = {}

    def today(self, user_id: str) -> Day:
        date = datetime.date.today()
        day = self._days.get(user_id)
        if day is None or day.date != date:
            day = self._days[user_id] = Day(date)
        return day

    def labeled(self, user_id: str, seconds: float) -> Day:
        day = self.today(user_id)
        day.labels += 1
        # A tab left open over lunch would swamp the average; an hour caps one item.
        day.seconds += min(max(seconds, 0.0), 3600.0)
        return day

    def skipped(self, user_id: str) -> Day:
        day = self.today(user_id)
        day.skips += 1
        return day
