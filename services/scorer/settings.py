from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings
from services.scorer.policy.model import LRPolicyConfig

_DEFAULTS = LRPolicyConfig()


class ScorerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_SCORER_", extra="ignore")

    grpc_port: int = Field(default=50053, ge=0, le=65535)
    http_port: int = Field(default=8083, ge=0, le=65535)
    # Refit after this many new human labels, or after refit_seconds when any arrived.
    refit_every: int = Field(default=10, ge=1)
    refit_seconds: float = Field(default=2.0, gt=0)
    min_human_labels: int = Field(default=_DEFAULTS.min_human_labels, ge=1)
    publish_batch_items: int = Field(default=64, ge=1)
    # Confident-learning audit of human labels: at most this many second opinions per refit.
    second_opinions_per_refit: int = Field(default=5, ge=0)
    # Few-shot demonstrations published for LLM backends (prompts stay short and cache-friendly).
    fewshot_per_label: int = Field(default=2, ge=0)
    fewshot_max_chars: int = Field(default=4000, ge=0)
    fewshot_pool: int = Field(default=2000, ge=1)
    # A project's model not used for this long is dropped (and its lease given up): memory follows
    # the active projects, and a model is rebuilt from PostgreSQL when its project wakes up.
    idle_evict_seconds: float = Field(default=1800.0, gt=0)
    # Waiting items re-scored per refit, round robin (services/scorer/waiting.py): bounds a refit's
    # time and the re-ranking it publishes, whatever the pool's size.
    rescore_slice_items: int = Field(default=10_000, ge=100)
    # Re-ranks a refit sends at most: those at the head of the queue, where people are served
    # (service.head_of_queue); with the slice, what keeps a refit's cost flat.
    rerank_limit: int = Field(default=4_000, ge=10)
    # Back-off of a message whose project another replica decides (it reaches the owner later).
    not_owner_retry_seconds: float = Field(default=1.0, gt=0)

    def policy(self) -> LRPolicyConfig:
        return LRPolicyConfig(min_human_labels=self.min_human_labels)
