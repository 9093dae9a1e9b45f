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
    # Rows per Parquet row group (and per encoded batch): larger compresses better and reads
    # faster; each batch is held decoded in memory while it is encoded.
    row_group_rows: int = Field(default=20_000, ge=1)
    # Snapshots (their rows are a full copy of the project) older than this are deleted by the
    # sweeper; 0 keeps them forever.
    retention_hours: float = Field(default=168.0, ge=0)
    sweep_seconds: float = Field(default=300.0, gt=0)
    # Rows copied per page of an export job: each page is one INSERT ... SELECT and one progress
    # update, so smaller pages show progress more often at a little more overhead.
    page_rows: int = Field(default=20_000, ge=1)
    # How often a stream of a snapshot still building looks whether it is ready.
    wait_poll_seconds: float = Field(default=0.2, gt=0)
