from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class ReviewSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_REVIEW_", extra="ignore")

    grpc_port: int = Field(default=50054, ge=0, le=65535)
    http_port: int = Field(default=8084, ge=0, le=65535)
    lease_seconds: float = Field(default=300.0, gt=0)
    max_lease_seconds: float = Field(default=3600.0, gt=0)
    # How often expired leases go back to the queue.
    lease_sweep_seconds: float = Field(default=1.0, gt=0)
