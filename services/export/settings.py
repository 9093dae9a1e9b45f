from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class ExportSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_EXPORT_", extra="ignore")

    grpc_port: int = Field(default=50055, ge=0, le=65535)
    http_port: int = Field(default=8085, ge=0, le=65535)
    # Lines per streamed chunk: large enough to amortize the per-message cost, small enough for memory.
    chunk_lines: int = Field(default=500, ge=1)
