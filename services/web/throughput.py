"""Throughput over time for the status page: a project's counts, sampled while someone watches.

Each time a status page is rendered (it refreshes itself every few seconds) the project's final
and human label counts are appended to a bounded ring; rates are differences between samples.
Kept in the app's memory only (a restart or another replica starts from zero), like "my progress
today": a view of the last two hours while someone has the page open, not a record — the
services' Prometheus metrics are that.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

WINDOW_SECONDS = 2 * 3600.0
# Several people watching one project add one point per refresh between them, not one each.
MIN_SPACING_SECONDS = 4.0
# A rate is taken over about a minute of samples: labels arrive in bursts, and a 5-second
# difference of integer counts would make a saw of the line.
RATE_SECONDS = 60.0
# Nor is a rate drawn from less than this: the first points after the page opens would be noise.
MIN_RATE_SECONDS = 15.0
# Nobody watched for longer than this: the line breaks rather than averaging over the gap.
GAP_SECONDS = 60.0
MAX_PROJECTS = 1000


@dataclass(frozen=True)
class Sample:
    at: float  # seconds on the app's monotonic clock
    final: int  # final labels (export)
    human: int  # labels people gave (review)


@dataclass(frozen=True)
class Rate:
    at: float
    final_per_minute: float
    human_per_minute: float


class Throughput:
    """One ring of samples per project, the least recently watched projects forgotten first."""

    def __init__(
        self,
        window: float = WINDOW_SECONDS,
        capacity: int = MAX_PROJECTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._window = window
        self._capacity = capacity
        self._clock = clock
        self._rings: OrderedDict[str, deque[Sample]] = OrderedDict()

    def record(self, project_id: str, final: int, human: int) -> list[Sample]:
        """Adds a sample (unless one was taken moments ago) and returns the project's samples."""
        now = self._clock()
        ring = self._rings.get(project_id)
        if ring is None:
            ring = self._rings[project_id] = deque(maxlen=int(self._window / MIN_SPACING_SECONDS) + 1)
            while len(self._rings) > self._capacity:
                self._rings.popitem(last=False)
        self._rings.move_to_end(project_id)
        if not ring or now - ring[-1].at >= MIN_SPACING_SECONDS:
            ring.append(Sample(now, final, human))
        while ring[0].at < now - self._window:
            ring.popleft()
        return list(ring)


def rates(samples: Sequence[Sample]) -> list[list[Rate]]:
    """Labels per minute at each sample, over the minute before it; one list per stretch of
    samples without a gap. Counts that fall (an item withdrawn) count as no progress."""
    segments: list[list[Rate]] = []
    start = 0
    for i, sample in enumerate(samples):
        if i == 0 or sample.at - samples[i - 1].at > GAP_SECONDS:
            start = i
            segments.append([])
            continue
        j = start
        while j < i - 1 and sample.at - samples[j].at > RATE_SECONDS:
            j += 1
        base = samples[j]
        if sample.at - base.at < MIN_RATE_SECONDS:
            continue
        minutes = (sample.at - base.at) / 60.0
        segments[-1].append(
            Rate(
                sample.at,
                max(sample.final - base.final, 0) / minutes,
                max(sample.human - base.human, 0) / minutes,
            )
        )
    return [segment for segment in segments if segment]
