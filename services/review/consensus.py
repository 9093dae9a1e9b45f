"""The aggregated label of items several people labeled (I/O around services.review.aggregation).

Each project with overlap has a Dawid-Skene model refitted in the background from all its
first-round labels (every person's confusion matrix: who to trust, and on which labels). An item
that completes is settled at once with one E-step of the current model (majority vote while there
is too little data to fit one). After each refit, items already settled are aggregated again and
those whose label changed are published again: early items were settled with less evidence (and
before a spammer was found out).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg

from services.common.errors import is_transient
from services.common.projects import ProjectDirectory
from services.review import aggregation, repo, workforce_repo
from services.review.aggregation import Judgment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settled:
    label: str
    posterior: float
    method: str  # "single", "majority_vote" or "dawid_skene"


def settle_item(
    model: aggregation.DawidSkeneModel | None,
    labels: Sequence[str],
    votes: Sequence[tuple[str, str]],
) -> Settled:
    """The label of one item from its (annotator, label) votes."""
    if len(votes) == 1:
        return Settled(votes[0][1], 1.0, "single")
    if model is None:
        vote = aggregation.majority_vote([Judgment("item", a, lb) for a, lb in votes], labels)["item"]
        return Settled(vote.label, vote.posterior, vote.method)
    posterior = model.posterior(list(votes))
    k = int(posterior.argmax())
    return Settled(labels[k], float(posterior[k]), "dawid_skene")


class ConsensusKeeper:
    def __init__(
        self,
        pool: asyncpg.Pool,
        projects: ProjectDirectory,
        every_seconds: float,
        on_changed: Callable[[str, dict[str, Settled]], Awaitable[None]],
    ) -> None:
        self._pool = pool
        self._projects = projects
        self._every = every_seconds
        self._models: dict[str, aggregation.DawidSkeneModel] = {}
        self._dirty: dict[str, float] = {}
        self._on_changed = on_changed
        # A refit reads and fits every overlap label of the project: on a large project it takes
        # seconds, so the next one waits at least ten times as long as the last took.
        self._next_at: dict[str, float] = {}

    def model(self, project_id: str) -> aggregation.DawidSkeneModel | None:
        return self._models.get(project_id)

    def method(self, project_id: str) -> str:
        return "dawid_skene" if project_id in self._models else "majority_vote"

    def touched(self, project_id: str) -> None:
        self._dirty.setdefault(project_id, time.monotonic())

    async def refit(self, project_id: str) -> dict[str, Settled]:
        """Refit the project's model; the settled items whose label changed."""
        project = await self._projects.get(project_id)
        async with self._pool.acquire() as conn:
            rows = await workforce_repo.judgments(conn, project_id)
            settled = await workforce_repo.consensus(conn, project_id)
            paused = await repo.paused(conn, project_id)
        judgments = [Judgment(i, a, lb) for i, a, lb in rows]
        model = await asyncio.to_thread(aggregation.fit_if_enough, judgments, project.label_names)
        if model is None:
            return {}
        self._models[project_id] = model
        by_item: dict[str, list[tuple[str, str]]] = {}
        for j in judgments:
            by_item.setdefault(j.item_id, []).append((j.annotator_id, j.label))
        changed: dict[str, Settled] = {}
        for item_id, (label, _, _) in settled.items():
            votes = by_item.get(item_id, [])
            counted = [v for v in votes if v[0] not in paused] or votes
            if len(counted) < 2:
                continue
            now = settle_item(model, project.label_names, counted)
            if now.label != label:
                changed[item_id] = now
        return changed

    async def loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for project_id in list(self._dirty):
                if time.monotonic() < self._next_at.get(project_id, 0.0):
                    continue
                self._dirty.pop(project_id, None)
                started = time.monotonic()
                try:
                    changed = await self.refit(project_id)
                    self._next_at[project_id] = time.monotonic() + 10 * (time.monotonic() - started)
                    if changed:
                        log.info(
                            "project %s: %d aggregated labels changed after a refit", project_id, len(changed)
                        )
                        await self._on_changed(project_id, changed)
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    log.warning("aggregation refit of %s failed; retrying", project_id, exc_info=True)
                    self.touched(project_id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._every)
