from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class InferenceSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_INFERENCE_", extra="ignore")

    grpc_port: int = Field(default=50052, ge=0, le=65535)
    http_port: int = Field(default=8082, ge=0, le=65535)
    backend: Literal["cpu"] = "cpu"
    # One torch thread: on small shared machines more threads contend and run slower.
    torch_threads: int = Field(default=1, ge=1)
    batch_size: int = Field(default=32, ge=1)
    temperature: float = Field(default=0.05, gt=0)
    heartbeat_seconds: float = Field(default=10.0, gt=0)
