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
    # Tasks one person may hold at once when their own cap is 0 (the web app holds two: the task
    # on screen and the next one, fetched ahead).
    max_leased_per_person: int = Field(default=10, ge=0)
    # How often Dawid-Skene is refitted for projects with new overlap labels.
    aggregate_seconds: float = Field(default=5.0, gt=0)
    # How often the queue gauges (depth and oldest task per pool) are recounted.
    gauge_seconds: float = Field(default=15.0, gt=0)
