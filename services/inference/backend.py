"""The seam between the inference service and whatever model labels the items.

Modelled on vLLM's EngineClient: a backend answers per request and reports its own health.
A bad request raises `BackendRequestError` (that batch is dead-lettered, the service goes on);
a dead engine raises `EngineDeadError` (the process stops, readiness fails, the orchestrator
restarts it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from services.common.errors import FatalError, PermanentError
from services.common.projects import ProjectSpec


class BackendRequestError(PermanentError):
    """This input cannot be labeled (too long for the model, refused by the endpoint)."""


class EngineDeadError(FatalError):
    """The model engine is gone; nothing more can be labeled by this process."""


class GenerationUnsupported(PermanentError):
    """This backend labels but cannot write text (the CPU default)."""


@dataclass(frozen=True)
class Prelabels:
    probs: np.ndarray  # (n, k) float32, rows sum to 1, columns in project label order
    embeddings: np.ndarray | None  # (n, d) float32, L2-normalized, when the backend embeds
    label_embeddings: np.ndarray | None  # (k, d) float32, the label descriptions in the same space
    prompt_hash: str


class LLMBackend(Protocol):
    @property
    def model_id(self) -> str: ...

    async def start(self) -> None:
        """Load the model; raises EngineDeadError when it cannot."""

    async def prelabel(self, project: ProjectSpec, texts: Sequence[str]) -> Prelabels:
        """The label distribution of every text, in order."""

    async def generate(
        self, project: ProjectSpec, label: str, *, count: int, seed: int, temperature: float
    ) -> list[str]:
        """Up to `count` new example texts of `label` (synthetic data); raises
        GenerationUnsupported when the backend cannot write text."""

    def healthy(self) -> bool: ...

    async def close(self) -> None: ...
