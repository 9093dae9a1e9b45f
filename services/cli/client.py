"""gRPC stubs for the CLI, over one channel per service."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc

from services.common.auth import bearer_interceptors
from services.gen.tandem.export.v1 import export_pb2_grpc
from services.gen.tandem.identity.v1 import identity_pb2_grpc
from services.gen.tandem.ingest.v1 import ingest_pb2_grpc
from services.gen.tandem.review.v1 import review_pb2_grpc
from services.gen.tandem.stats.v1 import stats_pb2, stats_pb2_grpc
from services.gen.tandem.workforce.v1 import workforce_pb2_grpc

# Transient failures (a service restarting) are retried by gRPC itself, not by hand-written loops.
_RETRY = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "3s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)
STATS_SERVICES = ("ingest", "scorer", "review", "export")


def channel(target: str, token: str | None = None) -> grpc.aio.Channel:
    """A channel that retries UNAVAILABLE, carries the token on every call, and speaks TLS when
    TANDEM_TLS_CA_FILE names the CA that signed the services' certificate."""
    opts = [("grpc.service_config", _RETRY), ("grpc.max_receive_message_length", 64 << 20)]
    interceptors: Any = bearer_interceptors(token) if token else None
    ca = os.environ.get("TANDEM_TLS_CA_FILE")
    if ca:
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes())
        return grpc.aio.secure_channel(target, credentials, options=opts, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=opts, interceptors=interceptors)


class Clients:
    def __init__(self, targets: dict[str, str], *, token: str | None = None) -> None:
        self.targets = targets
        self.token = token
        self._channels = {name: channel(t, token) for name, t in targets.items()}
        self.ingest = ingest_pb2_grpc.IngestServiceStub(self._channels["ingest"])
        self.review = review_pb2_grpc.ReviewServiceStub(self._channels["review"])
        self.export = export_pb2_grpc.ExportServiceStub(self._channels["export"])
        self.report = export_pb2_grpc.ReportServiceStub(self._channels["export"])
        # The workforce is served by the review service.
        self.workforce = workforce_pb2_grpc.WorkforceServiceStub(self._channels["review"])
        if "identity" in self._channels:
            self.identity = identity_pb2_grpc.IdentityServiceStub(self._channels["identity"])
        self._stats = {name: stats_pb2_grpc.StatsServiceStub(self._channels[name]) for name in STATS_SERVICES}

    async def stats(self, project_id: str) -> stats_pb2.ProjectStats:
        """Every service's part of the project's stats, merged into one message."""
        request = stats_pb2.GetProjectStatsRequest(project_id=project_id)
        parts = await asyncio.gather(
            *(stub.GetProjectStats(request, timeout=10) for stub in self._stats.values())
        )
        merged = stats_pb2.ProjectStats(project_id=project_id)
        for part in parts:
            merged.MergeFrom(part)
        return merged

    async def close(self) -> None:
        await asyncio.gather(*(ch.close(None) for ch in self._channels.values()))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
