from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class IngestSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_INGEST_", extra="ignore")

    grpc_port: int = Field(default=50051, ge=0, le=65535)
    http_port: int = Field(default=8081, ge=0, le=65535)
    max_text_bytes: int = Field(default=64 * 1024, gt=0)
    max_items_per_request: int = Field(default=10_000, gt=0)
    max_metadata_keys: int = Field(default=32, ge=0)
    max_metadata_value_chars: int = Field(default=1024, gt=0)
    # Bus messages carry batches; these bound one message (NATS' default max payload is 1 MiB).
    # 256: per-message costs (a transaction per consumer) amortized; 64 gave 40% fewer items/s
    # in loadtests.pipeline.
    publish_batch_items: int = Field(default=256, gt=0)
    publish_batch_bytes: int = Field(default=512 * 1024, gt=0)
