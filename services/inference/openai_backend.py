"""The `openai` backend: any OpenAI-compatible endpoint (`vllm serve`, another team's server).

Two modes, picked once at start:
- *token mode*, when the server tokenizes (vLLM's `POST /tokenize`, which also applies the
  model's chat template to messages): prompts go out as token ids, so label scoring reads the
  label positions' `prompt_logprobs` exactly, and the choice method asks for the labels' first
  tokens with `logprob_token_ids` — the same distributions the in-process vLLM backend computes.
- *text mode* for servers without it: the plain transcript prompt, label scoring through
  `echo` + `logprobs` (the label's tokens are those at or after the prompt's length in
  `text_offset`); the choice method needs token ids, so it falls back to scoring.

Requests are bounded by `max_concurrency` and retried with exponential back-off and jitter
(tenacity) on connection errors, 408, 429 and 5xx; other 4xx answers are the request's fault.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import numpy as np
from pydantic import SecretStr
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from services.common.errors import RetryableError
from services.common.fewshot import FewShotSet
from services.common.projects import ProjectSpec
from services.inference.backend import BackendRequestError, EngineDeadError, Prelabels
from services.inference.distributions import mean_logprob, normalise
from services.inference.engine_stats import EngineStats
from services.inference.prompts import (
    DemoSource,
    LabelPrompt,
    Message,
    generation_messages,
    render_plain,
)
from services.inference.vllm_backend import fewshot_or_none, gather_or_cancel, label_with_embeddings

log = logging.getLogger(__name__)

_TRANSIENT_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class OpenAIConfig:
    base_url: str  # up to and including /v1
    model: str
    api_key: SecretStr = field(default_factory=lambda: SecretStr(""))
    label_method: Literal["score", "choice"] = "choice"
    max_concurrency: int = 64
    timeout_seconds: float = 60.0
    max_attempts: int = 5
    generate_max_tokens: int = 160


class _Transient(Exception):
    """A failure worth another attempt (connection, timeout, 429, 5xx)."""


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, _Transient)


@dataclass
class _Encoded:
    prompt: LabelPrompt
    label_ids: list[list[int]] | None  # token mode
    first_ids: list[int] | None


class OpenAIBackend:
    def __init__(
        self, config: OpenAIConfig, *, embedder: Any | None = None, demos: DemoSource | None = None
    ) -> None:
        self._config = config
        self._embedder = embedder
        self._demos = demos
        self._client: httpx.AsyncClient | None = None
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self._token_mode = False
        self._encoded: dict[tuple[str, str], _Encoded] = {}
        self.stats = EngineStats()
        # The method the last prelabel() used (choice falls back to score when it cannot apply).
        self.last_method: Literal["score", "choice"] = config.label_method

    @property
    def model_id(self) -> str:
        return f"openai:{self._config.model}"

    @property
    def token_mode(self) -> bool:
        return self._token_mode

    async def start(self) -> None:
        headers = {}
        if key := self._config.api_key.get_secret_value():
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=self._config.timeout_seconds,
            limits=httpx.Limits(max_connections=self._config.max_concurrency),
        )
        try:
            models = await self._request("GET", self._url("/models"))
        except (RetryableError, BackendRequestError) as exc:
            raise EngineDeadError(f"the endpoint {self._config.base_url} does not answer: {exc}") from exc
        served = [m.get("id") for m in models.get("data", [])]
        if served and self._config.model not in served:
            raise EngineDeadError(f"the endpoint serves {served}, not {self._config.model!r}")
        try:
            await self._tokenize_messages([{"role": "user", "content": "ping"}])
            self._token_mode = True
        except BackendRequestError:
            log.info("the endpoint does not tokenize; labeling in text mode")
        if self._embedder is not None:
            await self._embedder.start()

    def healthy(self) -> bool:
        return self._client is not None and not self._client.is_closed

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
        if self._embedder is not None:
            await self._embedder.close()

    # -- HTTP ---------------------------------------------------------------------------------

    def _url(self, path: str, *, root: bool = False) -> str:
        base = self._config.base_url.rstrip("/")
        if root and base.endswith("/v1"):
            base = base[: -len("/v1")]
        return base + path

    async def _request(self, method: str, url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        client = self._client
        if client is None:
            raise EngineDeadError("the openai backend is not started")

        async def once() -> dict[str, Any]:
            try:
                response = await client.request(method, url, json=body)
            except httpx.TransportError as exc:
                raise _Transient(f"{type(exc).__name__}: {exc}") from exc
            if response.status_code in _TRANSIENT_STATUS:
                raise _Transient(f"HTTP {response.status_code}: {response.text[:200]}")
            if response.status_code >= 400:
                raise BackendRequestError(f"HTTP {response.status_code} from {url}: {response.text[:300]}")
            data = response.json()
            assert isinstance(data, dict)
            return data

        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self._config.max_attempts),
                wait=wait_exponential_jitter(initial=0.5, max=10),
                retry=retry_if_exception(_is_transient),
                reraise=True,
            ):
                with attempt:
                    async with self._slots:
                        return await once()
        except _Transient as exc:
            # The endpoint is down or overloaded: try the batch again later rather than drop it.
            raise RetryableError(f"{url}: {exc}", delay=5.0) from exc
        raise AssertionError("unreachable")

    async def _tokenize_messages(self, messages: list[Message]) -> list[int]:
        body = {"model": self._config.model, "messages": messages, "add_generation_prompt": True}
        data = await self._request("POST", self._url("/tokenize", root=True), body)
        return [int(t) for t in data["tokens"]]

    async def _tokenize(self, text: str) -> list[int]:
        body = {"model": self._config.model, "prompt": text, "add_special_tokens": False}
        data = await self._request("POST", self._url("/tokenize", root=True), body)
        return [int(t) for t in data["tokens"]]

    async def _complete(self, body: dict[str, Any]) -> dict[str, Any]:
        data = await self._request("POST", self._url("/completions"), {"model": self._config.model, **body})
        usage = data.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        self.stats.add(
            int(usage.get("prompt_tokens") or 0),
            int(details.get("cached_tokens") or 0),
            int(usage.get("completion_tokens") or 0),
        )
        return data

    # -- labeling -----------------------------------------------------------------------------

    async def prelabel(
        self,
        project: ProjectSpec,
        texts: Sequence[str],
        *,
        method: Literal["score", "choice"] | None = None,
    ) -> Prelabels:
        """`method` overrides the configured label method (the benchmark compares both)."""
        fewshot = await self._fewshot(project.project_id)
        encoded = await self._encode_project(project, fewshot)
        if not self._token_mode:
            one: Any = self._score_text
            self.last_method = "score"
        elif (method or self._config.label_method) == "choice" and encoded.first_ids is not None:
            one = self._choice_tokens
            self.last_method = "choice"
        else:
            one = self._score_tokens
            self.last_method = "score"
        return await label_with_embeddings(
            project, texts, [one(encoded, text) for text in texts], self._embedder, encoded.prompt.prompt_hash
        )

    async def _fewshot(self, project_id: str) -> FewShotSet | None:
        return await fewshot_or_none(self._demos, project_id)

    async def _encode_project(self, project: ProjectSpec, fewshot: FewShotSet | None) -> _Encoded:
        prompt = LabelPrompt.build(project, fewshot.demos if fewshot is not None else ())
        key = (project.project_id, prompt.prompt_hash)
        if (cached := self._encoded.get(key)) is not None:
            return cached
        label_ids: list[list[int]] | None = None
        firsts: list[int] | None = None
        if self._token_mode:
            # After a chat template's generation prompt the answer starts without a space.
            label_ids = [await self._tokenize(name) for name in prompt.labels]
            heads = [ids[0] for ids in label_ids if ids]
            firsts = heads if len(set(heads)) == len(prompt.labels) else None
        encoded = _Encoded(prompt, label_ids, firsts)
        self._encoded = {k: v for k, v in self._encoded.items() if k[0] != project.project_id}
        self._encoded[key] = encoded
        return encoded

    async def _score_tokens(self, encoded: _Encoded, text: str) -> np.ndarray:
        assert encoded.label_ids is not None
        prompt_ids = await self._tokenize_messages(encoded.prompt.messages(text))

        async def loglik(label_ids: list[int]) -> float:
            ids = prompt_ids + label_ids
            data = await self._complete(
                {"prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
            )
            plp = data["choices"][0].get("prompt_logprobs") or []
            lps = []
            for pos in range(len(prompt_ids), len(ids)):
                entry = plp[pos] if pos < len(plp) else None
                if entry and str(ids[pos]) in entry:
                    lps.append(float(entry[str(ids[pos])]["logprob"]))
            return mean_logprob(lps)

        return normalise(await gather_or_cancel([loglik(ids) for ids in encoded.label_ids]))

    async def _choice_tokens(self, encoded: _Encoded, text: str) -> np.ndarray:
        assert encoded.first_ids is not None
        prompt_ids = await self._tokenize_messages(encoded.prompt.messages(text))
        data = await self._complete(
            {
                "prompt": prompt_ids,
                "max_tokens": 1,
                "temperature": 0,
                "logprobs": 1,
                "logprob_token_ids": encoded.first_ids,
                "return_tokens_as_token_ids": True,
            }
        )
        top = ((data["choices"][0].get("logprobs") or {}).get("top_logprobs") or [{}])[0] or {}
        return normalise([top.get(f"token_id:{t}") for t in encoded.first_ids])

    async def _score_text(self, encoded: _Encoded, text: str) -> np.ndarray:
        prompt = render_plain(encoded.prompt.messages(text))

        async def loglik(label: str) -> float:
            full = f"{prompt} {label}"
            data = await self._complete(
                {"prompt": full, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 0}
            )
            lp = data["choices"][0].get("logprobs") or {}
            offsets = lp.get("text_offset") or []
            values = lp.get("token_logprobs") or []
            picked = [
                float(v)
                for off, v in zip(offsets, values, strict=False)
                if v is not None and len(prompt) <= off < len(full)
            ]
            return mean_logprob(picked)

        return normalise(await gather_or_cancel([loglik(name) for name in encoded.prompt.labels]))

    # -- synthetic examples -------------------------------------------------------------------

    async def generate(
        self, project: ProjectSpec, label: str, *, count: int, seed: int, temperature: float
    ) -> list[str]:
        fewshot = await self._fewshot(project.project_id)
        try:
            messages = generation_messages(project, label, fewshot.demos if fewshot is not None else ())
        except ValueError as exc:
            raise BackendRequestError(str(exc)) from exc
        prompt: list[int] | str = (
            await self._tokenize_messages(messages) if self._token_mode else render_plain(messages, "Text:")
        )

        async def one(i: int) -> str:
            data = await self._complete(
                {
                    "prompt": prompt,
                    "max_tokens": self._config.generate_max_tokens,
                    "temperature": temperature,
                    "top_p": 0.95,
                    "seed": seed + i,
                    "stop": ["\n\n"],
                }
            )
            return str(data["choices"][0].get("text") or "").strip()

        return [t for t in await gather_or_cancel([one(i) for i in range(count)]) if t]
