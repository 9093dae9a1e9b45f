"""Settings from the environment, one class per service on a common base.

Common values use the `TANDEM_` prefix (`TANDEM_NATS_URL`); each service's own values use
`TANDEM_<SERVICE>_` (`TANDEM_INGEST_GRPC_PORT`). Invalid values stop the process at start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import grpc
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_MARKERS = ("CHANGE_ME", "changeme", "<password>")


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_", extra="ignore")

    nats_url: str = "nats://127.0.0.1:4222"
    # JetStream replication of every stream and bucket; at most the number of NATS servers.
    nats_stream_replicas: int = Field(default=1, ge=1, le=5)
    database_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/postgres")
    log_level: str = "INFO"
    log_format: Literal["console", "json"] = "console"
    bind_host: str = "127.0.0.1"
    # Below the pod's terminationGracePeriodSeconds so the drain always finishes.
    drain_seconds: float = Field(default=20.0, gt=0)
    db_pool_min: int = Field(default=1, ge=1)
    db_pool_max: int = Field(default=8, ge=1)
    # TLS for gRPC (and the web app's HTTP): both files set = TLS on; neither = plaintext.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    def grpc_server_credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert_file is None and self.tls_key_file is None:
            return None
        if self.tls_cert_file is None or self.tls_key_file is None:
            raise ValueError("TLS needs both TANDEM_TLS_CERT_FILE and TANDEM_TLS_KEY_FILE")
        return grpc.ssl_server_credentials(
            [(self.tls_key_file.read_bytes(), self.tls_cert_file.read_bytes())]
        )

    @field_validator("database_url")
    @classmethod
    def _refuse_placeholder(cls, value: SecretStr) -> SecretStr:
        secret = value.get_secret_value()
        if any(marker in secret for marker in PLACEHOLDER_MARKERS):
            raise ValueError("TANDEM_DATABASE_URL still holds a placeholder; set the real URL")
        return value


class ServiceSettings(BaseSettings):
    """Ports every service has; subclasses set the prefix and the defaults."""

    model_config = SettingsConfigDict(extra="ignore")

    grpc_port: int = Field(default=0, ge=0, le=65535)
    http_port: int = Field(default=0, ge=0, le=65535)
