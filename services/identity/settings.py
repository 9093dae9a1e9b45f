from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class IdentitySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_IDENTITY_", extra="ignore")

    grpc_port: int = Field(default=50056, ge=0, le=65535)
    http_port: int = Field(default=8086, ge=0, le=65535)
    # On a first start (no admin yet) an `admin` user and an API token are created and written
    # here (mode 0600) for `tandem up` to print; nothing is written when unset.
    bootstrap_file: Path | None = None
    session_seconds: float = Field(default=12 * 3600, gt=0)
    token_ttl_seconds: float = Field(default=90 * 24 * 3600, gt=0)
    max_token_ttl_seconds: float = Field(default=366 * 24 * 3600, gt=0)
    # Failed logins per user and per address within the window before Login refuses.
    login_failures: int = Field(default=5, ge=1)
    login_window_seconds: float = Field(default=300.0, gt=0)
    min_password_length: int = Field(default=10, ge=1)
