"""Token counts of the requests an engine answered: throughput and prefix-cache hit rate.

Read from each finished request's output (`num_cached_tokens` is what the prefix cache served),
so the figures need no access to the engine's own stat loggers, and exported as metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

PROMPT_TOKENS = Counter("tandem_inference_prompt_tokens_total", "Prompt tokens sent to the engine.")
CACHED_TOKENS = Counter(
    "tandem_inference_cached_prompt_tokens_total", "Prompt tokens the engine served from its prefix cache."
)
GENERATED_TOKENS = Counter("tandem_inference_generated_tokens_total", "Tokens the engine generated.")
REQUESTS = Counter("tandem_inference_engine_requests_total", "Requests the engine answered.")


@dataclass
class EngineStats:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def add(self, prompt: int, cached: int, generated: int) -> None:
        self.requests += 1
        self.prompt_tokens += prompt
        self.cached_tokens += cached
        self.generated_tokens += generated
        REQUESTS.inc()
        PROMPT_TOKENS.inc(prompt)
        CACHED_TOKENS.inc(cached)
        GENERATED_TOKENS.inc(generated)

    def record(self, output: Any) -> None:
        """Counts one finished vLLM `RequestOutput`."""
        prompt = len(output.prompt_token_ids or ())
        generated = sum(len(o.token_ids) for o in output.outputs)
        self.add(prompt, int(output.num_cached_tokens or 0), generated)

    def snapshot(self) -> EngineStats:
        return EngineStats(self.requests, self.prompt_tokens, self.cached_tokens, self.generated_tokens)
