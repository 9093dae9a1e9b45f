"""A replay labeler for load tests only: distributions and embeddings derived from a hash of each
text, at memory speed, so a load test measures the platform and not the model.

It is never a stand-in for a real model's accuracy: its "labels" are a hash of the text. Each
text gets a class (the hash modulo the number of labels), an embedding near that class's vector
with a little hashed noise, and the softmax of its similarity to the class vectors, so the scorer
sees the same shapes as from MiniLM (d = 384) and a model it fits has something to learn. A
simulated person who answers replay_class(text) is right where the labeler is wrong.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import numpy as np

from services.common.projects import ProjectSpec
from services.inference.backend import GenerationUnsupported, Prelabels

log = logging.getLogger(__name__)

DIM = 384
# Hashed noise is drawn from this many fixed vectors: computing a Gaussian per item would cost
# more than the rest of the backend together.
NOISE_ROWS = 4096
SEED = 20261201


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def replay_class(text: str, n_labels: int) -> int:
    """The class the replay labeler gives `text` (a load generator's simulated people use it)."""
    return text_hash(text) % n_labels


class ReplayBackend:
    def __init__(self, *, dim: int = DIM, noise: float = 1.0, sharpness: float = 8.0) -> None:
        rng = np.random.default_rng(SEED)
        self._dim = dim
        self._noise_rows = rng.standard_normal((NOISE_ROWS, dim)).astype(np.float32) / np.sqrt(dim)
        self._noise = noise
        self._sharpness = sharpness
        self._label_cache: dict[int, np.ndarray] = {}

    @property
    def model_id(self) -> str:
        return f"replay-hash-d{self._dim}"

    async def start(self) -> None:
        log.warning("the replay labeler is running: labels are hashes of the texts (load tests only)")

    def healthy(self) -> bool:
        return True

    def _label_vectors(self, k: int) -> np.ndarray:
        vectors = self._label_cache.get(k)
        if vectors is None:
            rng = np.random.default_rng(SEED + k)
            raw = rng.standard_normal((k, self._dim)).astype(np.float32)
            vectors = raw / np.linalg.norm(raw, axis=1, keepdims=True)
            self._label_cache[k] = vectors
        return vectors

    async def prelabel(self, project: ProjectSpec, texts: Sequence[str]) -> Prelabels:
        k = len(project.labels)
        labels = self._label_vectors(k)
        hashes = np.fromiter((text_hash(t) for t in texts), dtype=np.uint64, count=len(texts))
        classes = (hashes % np.uint64(k)).astype(np.int64)
        noise_row = ((hashes >> np.uint64(16)) % np.uint64(NOISE_ROWS)).astype(np.int64)
        # Each item leans towards a second class by a hashed amount; past 1 it looks more like that
        # one (a labeler wrong on ~1 item in 6), near 1 it is ambiguous: the scorer has uncertain
        # items to route and errors to find.
        other = (classes + 1 + ((hashes >> np.uint64(8)) % np.uint64(max(k - 1, 1))).astype(np.int64)) % k
        lean = 1.2 * ((hashes >> np.uint64(40)) % np.uint64(100)).astype(np.float32) / 100.0
        emb = labels[classes] + lean[:, None] * labels[other] + self._noise * self._noise_rows[noise_row]
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        logits = self._sharpness * (emb @ labels.T)
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        return Prelabels(
            probs=probs.astype(np.float32),
            embeddings=emb.astype(np.float32),
            label_embeddings=labels,
            prompt_hash=f"replay-{k}",
        )

    async def generate(
        self, project: ProjectSpec, label: str, *, count: int, seed: int, temperature: float
    ) -> list[str]:
        raise GenerationUnsupported("the replay labeler cannot write text (load tests only)")

    async def close(self) -> None:
        return None
