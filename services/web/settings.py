"""Settings of the web app (`TANDEM_WEB_…`), plus the service addresses it calls."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import PLACEHOLDER_MARKERS, ServiceSettings

SERVICES = ("ingest", "inference", "scorer", "review", "export", "identity")


def _target(service: str, port: int) -> Any:
    # The targets are the ones every client reads (`TANDEM_<SVC>_TARGET`, as the CLI does), not
    # web-prefixed copies, so one environment configures every client alike.
    return Field(
        default=f"127.0.0.1:{port}",
        validation_alias=AliasChoices(f"TANDEM_{service.upper()}_TARGET", f"{service}_target"),
    )


class WebSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_WEB_", extra="ignore", populate_by_name=True)

    grpc_port: int = Field(default=50057, ge=0, le=65535)
    http_port: int = Field(default=8087, ge=0, le=65535)
    # Where people reach the app (the ops port above serves /metrics and probes only).
    app_port: int = Field(default=8080, ge=0, le=65535)
    # Keys the CSRF tokens. Random per process when unset: fine for one replica; replicas behind
    # one address must share it, or a form rendered by one is refused by another.
    secret: SecretStr = Field(default_factory=lambda: SecretStr(secrets.token_urlsafe(32)), min_length=16)
    session_seconds: float = Field(default=12 * 3600, gt=0)
    # None = on exactly when the app serves HTTPS; set it explicitly behind a TLS-terminating proxy.
    cookie_secure: bool | None = None
    # Behind a reverse proxy, the browser's address is the first X-Forwarded-For hop (used for the
    # login rate limit); off by default because a direct client could forge it.
    trust_forwarded_for: bool = False
    # How long the app believes a session's role and memberships before asking identity again.
    principal_cache_seconds: float = Field(default=10.0, ge=0)
    # Seconds a gRPC call may take before the page says the service is down.
    call_timeout_seconds: float = Field(default=10.0, gt=0)
    upload_batch_items: int = Field(default=500, gt=0)
    max_upload_bytes: int = Field(default=256 << 20, gt=0)
    # A private CA for the services' TLS certificates (system roots when unset).
    tls_ca_file: Path | None = Field(default=None, validation_alias=AliasChoices("TANDEM_TLS_CA_FILE"))

    ingest_target: str = _target("ingest", 50051)
    inference_target: str = _target("inference", 50052)
    scorer_target: str = _target("scorer", 50053)
    review_target: str = _target("review", 50054)
    export_target: str = _target("export", 50055)
    identity_target: str = _target("identity", 50056)

    @field_validator("secret")
    @classmethod
    def _refuse_placeholder(cls, value: SecretStr) -> SecretStr:
        if any(marker in value.get_secret_value() for marker in PLACEHOLDER_MARKERS):
            raise ValueError("TANDEM_WEB_SECRET still holds a placeholder; set a random value")
        return value

    def targets(self) -> dict[str, str]:
        return {name: str(getattr(self, f"{name}_target")) for name in SERVICES}
