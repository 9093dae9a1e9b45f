"""The CPU labeler: sentence embeddings (services/inference/encoders.py) plus zero-shot scoring.

Pure, synchronous compute. Services wrap it in an executor; nothing here knows about asyncio or NATS.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from services.inference.encoders import MINILM, Encoder, encoder_named, verify_weights


def label_texts(labels: Sequence[tuple[str, str]]) -> list[str]:
    """Text embedded for each (name, description) label in zero-shot scoring.

    The description carries most of the signal; the name is prefixed so short or empty descriptions
    still produce a meaningful vector.
    """
    out: list[str] = []
    for name, description in labels:
        readable = name.replace("_", " ").strip()
        desc = description.strip()
        out.append(f"{readable}: {desc}" if desc else readable)
    return out


def softmax_scores(scores: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise softmax of scores / temperature, float32, numerically stable."""
    z = np.asarray(scores, dtype=np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return out


class SentenceLabeler:
    """Embeds texts with a sentence model on CPU and scores them against label descriptions."""

    model_id: str
    dimension: int

    def __init__(
        self,
        *,
        encoder: Encoder | str = MINILM,
        torch_threads: int = 1,
        batch_size: int = 32,
        max_seq_length: int = 256,
        temperature: float = 0.05,
    ) -> None:
        # The model ships inside a pip package; any attempt to reach the Hub would only add latency or
        # fail on air-gapped machines. Must be set before transformers is imported.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

        # Imported lazily so that importing this module (e.g. for label_texts) stays cheap.
        import torch
        from sentence_transformers import SentenceTransformer

        spec = encoder_named(encoder) if isinstance(encoder, str) else encoder
        model_dir = spec.locate()
        verify_weights(model_dir, spec.weights_sha256)

        # On small shared machines one intra-op thread avoids oversubscription and is faster overall.
        torch.set_num_threads(torch_threads)
        self._model: Any = SentenceTransformer(str(model_dir), device="cpu")
        self._model.max_seq_length = max_seq_length
        self._batch_size = batch_size
        self.temperature = temperature
        self.encoder = spec
        self.model_id = spec.model_id()
        # sentence-transformers renamed this accessor; accept either so a minor upgrade does not break us.
        get_dim = (
            getattr(self._model, "get_embedding_dimension", None)
            or self._model.get_sentence_embedding_dimension
        )
        dim = get_dim()
        self.dimension = int(dim) if dim is not None else spec.dimension

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalized float32 embeddings, shape (len(texts), dimension)."""
        if len(texts) == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vecs = self._model.encode(
            list(texts),
            batch_size=self._batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def embed_labels(self, labels: Sequence[tuple[str, str]]) -> np.ndarray:
        return self.embed(label_texts(labels))

    def zero_shot(self, embeddings: np.ndarray, label_embeddings: np.ndarray) -> np.ndarray:
        """(n, k) class probabilities: softmax(cosine / temperature); rows sum to 1."""
        cosine = np.asarray(embeddings, dtype=np.float32) @ np.asarray(label_embeddings, dtype=np.float32).T
        return softmax_scores(cosine, self.temperature)

    # Kept as a static alias so callers can use either SentenceLabeler.label_texts or the module function.
    label_texts = staticmethod(label_texts)
