"""The CPU default backend: zero-shot labels from a sentence model installed by pip."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from services.common.projects import ProjectSpec
from services.inference.backend import EngineDeadError, GenerationUnsupported, Prelabels
from services.inference.encoders import MINILM, Encoder
from services.inference.sentence_labeler import SentenceLabeler, label_texts


class CpuBackend:
    def __init__(
        self,
        *,
        encoder: Encoder = MINILM,
        torch_threads: int = 1,
        batch_size: int = 32,
        temperature: float = 0.05,
    ) -> None:
        self._encoder = encoder
        self._torch_threads = torch_threads
        self._batch_size = batch_size
        self._temperature = temperature
        self._labeler: SentenceLabeler | None = None
        # One thread: the model is CPU-bound and torch is pinned to its own threads; the event loop
        # stays free for heartbeats and health checks.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labeler")
        self._label_cache: dict[tuple[tuple[str, str], ...], np.ndarray] = {}

    @property
    def model_id(self) -> str:
        return self._labeler.model_id if self._labeler is not None else self._encoder.model_name

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._labeler = await loop.run_in_executor(
                self._executor,
                lambda: SentenceLabeler(
                    encoder=self._encoder,
                    torch_threads=self._torch_threads,
                    batch_size=self._batch_size,
                    temperature=self._temperature,
                ),
            )
        except Exception as exc:
            raise EngineDeadError(f"cannot load the CPU labeler: {exc}") from exc

    def healthy(self) -> bool:
        return self._labeler is not None

    async def prelabel(self, project: ProjectSpec, texts: Sequence[str]) -> Prelabels:
        labeler = self._labeler
        if labeler is None:
            raise EngineDeadError("the CPU labeler is not loaded")
        labels = tuple((lb.name, lb.description) for lb in project.labels)
        loop = asyncio.get_running_loop()
        label_emb = self._label_cache.get(labels)
        if label_emb is None:
            label_emb = await loop.run_in_executor(self._executor, labeler.embed_labels, labels)
            self._label_cache[labels] = label_emb
        emb = await loop.run_in_executor(self._executor, labeler.embed, list(texts))
        probs = labeler.zero_shot(emb, label_emb)
        prompt = "\n".join(label_texts(labels)) + f"\nT={labeler.temperature}"
        return Prelabels(
            probs=probs,
            embeddings=emb,
            label_embeddings=label_emb,
            prompt_hash=hashlib.sha256(prompt.encode()).hexdigest()[:16],
        )

    async def generate(
        self, project: ProjectSpec, label: str, *, count: int, seed: int, temperature: float
    ) -> list[str]:
        raise GenerationUnsupported(
            "the cpu backend cannot generate text; run the inference service with "
            "TANDEM_INFERENCE_BACKEND=vllm or openai"
        )

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
