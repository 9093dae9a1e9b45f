"""Fixtures of the vLLM tier: the tiny local model and one engine per test module.

The tier runs in `.venv-vllm` (`make test-vllm`); in a venv without vLLM its tests are not even
collected, so `pytest tests` anywhere else never imports it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.inference.vllm_backend import VllmBackend, VllmConfig

REPO = Path(__file__).resolve().parents[2]

if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny model directory; built here when missing (about a minute on 2 cores)."""
    path = Path(os.environ.get("TANDEM_TINY_MODEL", REPO / ".state" / "models" / "tiny-llama"))
    if not (path / "config.json").is_file():
        from tests.vllm.tiny_model import build

        build(path)
    return path


def tiny_config(model: Path, **overrides: object) -> VllmConfig:
    # float32, a small KV cache in bytes and eager mode: the CPU settings that start in ~20 s.
    settings: dict[str, object] = {
        "model": str(model),
        "dtype": "float32",
        "max_model_len": 1024,
        "kv_cache_bytes": 64 << 20,
        "enforce_eager": True,
        # CPU's default block (128 tokens) is longer than the tiny prompts' shared prefix.
        "block_size": 32,
        "max_concurrency": 64,
        "generate_max_tokens": 48,
    }
    settings.update(overrides)
    return VllmConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
async def vllm_backend(tiny_model: Path) -> AsyncIterator[VllmBackend]:
    """One engine shared by a module's tests (start-up dominates the tier's time)."""
    backend = VllmBackend(tiny_config(tiny_model))
    await backend.start()
    try:
        yield backend
    finally:
        # Explicitly: an engine left to interpreter exit occasionally aborts the process.
        await backend.close()
