"""gRPC stubs for the CLI, over one channel per service."""

from __future__ import annotations

import asyncio
import json
from types import TracebackType
from typing import Self

import grpc

from services.gen.tandem.export.v1 import export_pb2_grpc
from services.gen.tandem.ingest.v1 import ingest_pb2_grpc
from services.gen.tandem.review.v1 import review_pb2_grpc
from services.gen.tandem.stats.v1 import stats_pb2, stats_pb2_grpc

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


class Clients:
    def __init__(self, targets: dict[str, str]) -> None:
        self.targets = targets
        opts = [("grpc.service_config", _RETRY), ("grpc.max_receive_message_length", 64 << 20)]
        self._channels = {name: grpc.aio.insecure_channel(t, options=opts) for name, t in targets.items()}
        self.ingest = ingest_pb2_grpc.IngestServiceStub(self._channels["ingest"])
        self.review = review_pb2_grpc.ReviewServiceStub(self._channels["review"])
        self.export = export_pb2_grpc.ExportServiceStub(self._channels["export"])
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
