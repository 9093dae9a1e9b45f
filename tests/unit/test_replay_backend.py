"""The load tests' replay labeler: deterministic, MiniLM's shapes, and a class a simulated person can
know (it is never evidence of a model's accuracy)."""

from __future__ import annotations

import numpy as np

from services.common.projects import LabelSpec, ProjectSpec
from services.inference.replay_backend import DIM, ReplayBackend, replay_class

SPEC = ProjectSpec("p", "p", tuple(LabelSpec(c, c) for c in "abcd"), "", 0.95, 0.0)


async def test_distributions_and_embeddings_have_minilm_shapes_and_repeat() -> None:
    backend = ReplayBackend()
    texts = [f"load test item {i} about markets and goals" for i in range(2000)]
    first = await backend.prelabel(SPEC, texts)
    again = await backend.prelabel(SPEC, list(reversed(texts)))
    assert first.probs.shape == (2000, 4) and first.embeddings is not None
    assert first.embeddings.shape == (2000, DIM) and first.label_embeddings is not None
    np.testing.assert_allclose(first.probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(first.embeddings, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(first.probs, again.probs[::-1])
    classes = np.array([replay_class(t, 4) for t in texts])
    # Mostly its own class, with a share of items near another one (the scorer needs both).
    agree = float((first.probs.argmax(axis=1) == classes).mean())
    assert 0.6 < agree < 1.0
    assert np.bincount(classes, minlength=4).min() > 400
