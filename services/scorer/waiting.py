"""The items waiting for people that a refit may still decide, kept in memory between refits.

Pure numpy, no I/O. A refit used to read every waiting item back from PostgreSQL, text included,
under the project lock: at a million waiting items that is gigabytes per refit. This keeps only
what a re-score needs: the feature row (float16: half the memory of float32, and a linear model's
decisions do not move at that precision), the priority review holds, whether the item is in a
flagged slice, and its fixed order draw. Refits re-score it in bounded slices, round robin, so the
time and memory of a refit stay flat as the pool grows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from services.scorer.policy.proposals import unit_draw

STORAGE = np.float16


@dataclass(frozen=True)
class Slice:
    """Rows of the set re-scored by one refit, copied out (the event loop may change the set
    while a worker thread scores them)."""

    item_ids: list[str]
    X: np.ndarray  # float32
    priorities: np.ndarray
    flagged: np.ndarray
    draws: np.ndarray


class WaitingSet:
    def __init__(
        self, n_features: int, flagged_slices: Iterable[tuple[str, str]] = (), capacity: int = 1024
    ) -> None:
        self.n_features = n_features
        # (field, value) of the slices audited more: new items in them are marked on arrival.
        self.flagged_slices = frozenset(flagged_slices)
        self._X = np.zeros((capacity, n_features), dtype=STORAGE)
        self._priority = np.zeros(capacity, dtype=np.float64)
        self._flagged = np.zeros(capacity, dtype=bool)
        self._draw = np.zeros(capacity, dtype=np.float64)
        self._alive = np.zeros(capacity, dtype=bool)
        self._ids: list[str | None] = []
        self._rows: dict[str, int] = {}
        self._cursor = 0

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._rows

    @property
    def nbytes(self) -> int:
        return int(self._X.nbytes + self._priority.nbytes + self._flagged.nbytes + self._draw.nbytes)

    def in_flagged_slice(self, metadata: dict[str, str]) -> bool:
        return any(metadata.get(f) == v for f, v in self.flagged_slices)

    def add(
        self,
        item_ids: Sequence[str],
        X: np.ndarray,
        priorities: Iterable[float],
        flagged: Iterable[bool] | None = None,
    ) -> None:
        """Items that now wait for people (an id already here keeps its row, updated)."""
        prio = np.fromiter(priorities, dtype=np.float64, count=len(item_ids))
        flags = (
            np.zeros(len(item_ids), dtype=bool)
            if flagged is None
            else np.fromiter(flagged, dtype=bool, count=len(item_ids))
        )
        for i, item_id in enumerate(item_ids):
            row = self._rows.get(item_id)
            if row is None:
                row = self._append(item_id)
            self._X[row] = X[i]
            self._priority[row] = prio[i]
            self._flagged[row] = flags[i]

    def _append(self, item_id: str) -> int:
        row = len(self._ids)
        if row == len(self._alive):
            self._grow(max(2 * row, 1024))
        self._ids.append(item_id)
        self._rows[item_id] = row
        self._alive[row] = True
        self._draw[row] = unit_draw(item_id, "order")
        return row

    def _rebuild(self, rows: np.ndarray, capacity: int) -> None:
        """Every per-row array re-made with `capacity` rows, holding `rows` of the old ones first."""

        def moved(a: np.ndarray) -> np.ndarray:
            out = np.zeros((capacity, *a.shape[1:]), dtype=a.dtype)
            out[: len(rows)] = a[rows]
            return out

        self._X = moved(self._X)
        self._priority = moved(self._priority)
        self._flagged = moved(self._flagged)
        self._draw = moved(self._draw)
        self._alive = moved(self._alive)

    def _grow(self, capacity: int) -> None:
        self._rebuild(np.arange(len(self._ids)), capacity)

    def discard(self, item_ids: Iterable[str]) -> None:
        """Items decided (accepted, labeled by people, made audits): no refit touches them again."""
        for item_id in item_ids:
            row = self._rows.pop(item_id, None)
            if row is not None:
                self._alive[row] = False
                self._ids[row] = None
        # Rows are freed by compaction once they are most of the matrix: a label at a time would
        # otherwise shift the whole matrix per label.
        if len(self._ids) > 4096 and len(self._rows) < len(self._ids) // 2:
            self._compact()

    def _compact(self) -> None:
        keep = np.flatnonzero(self._alive[: len(self._ids)])
        self._cursor = int(np.searchsorted(keep, self._cursor))
        self._rebuild(keep, max(len(keep) * 2, 1024))
        self._ids = [self._ids[r] for r in keep.tolist()]
        self._rows = {item_id: row for row, item_id in enumerate(self._ids) if item_id is not None}

    def set_priorities(self, changes: Iterable[tuple[str, float]]) -> None:
        for item_id, prio in changes:
            row = self._rows.get(item_id)
            if row is not None:
                self._priority[row] = prio

    def next_slice(self, limit: int) -> Slice:
        """Up to `limit` waiting items, continuing where the last slice stopped (all of them when
        the set is no larger)."""
        n = len(self._ids)
        alive = np.flatnonzero(self._alive[:n])
        if len(alive) <= limit:
            rows = alive
            self._cursor = 0
        else:
            start = int(np.searchsorted(alive, self._cursor))
            rows = np.roll(alive, -start)[:limit]
            self._cursor = int(rows[-1]) + 1
        return Slice(
            item_ids=[self._ids[r] or "" for r in rows.tolist()],
            X=self._X[rows].astype(np.float32),
            priorities=self._priority[rows].copy(),
            flagged=self._flagged[rows].copy(),
            draws=self._draw[rows].copy(),
        )
