"""What the load tests measure with: call timings, percentiles, CPU seconds per process."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Timings:
    """Latencies of the two calls an annotator makes, and what failed."""

    next_ms: list[float] = field(default_factory=list)
    submit_ms: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    empty: int = 0

    def fail(self, what: str) -> None:
        self.failures[what] = self.failures.get(what, 0) + 1


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_seconds(pid: int | None, *, with_children: bool = False) -> float:
    """utime + stime of a process; with_children adds its live children and the ones it reaped
    (PostgreSQL does its work in backends, forked per connection)."""
    if pid is None:
        return float("nan")
    own = _stat_fields(pid)
    if own is None:
        return float("nan")
    ticks = os.sysconf("SC_CLK_TCK")
    # Fields after the command name: state is 0, ppid 1, utime 11, stime 12, cutime 13, cstime 14.
    if not with_children:
        return (int(own[11]) + int(own[12])) / ticks
    total = sum(int(own[i]) for i in (11, 12, 13, 14))
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        child = _stat_fields(int(entry.name))
        if child is not None and int(child[1]) == pid:
            total += sum(int(child[i]) for i in (11, 12, 13, 14))
    return total / ticks
