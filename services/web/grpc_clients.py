"""One gRPC channel per service for the whole app; every call carries the person's own token.

The web app holds no credentials of its own: what a page may show is what the services answer
to the logged-in user's session token, so their access checks are the only ones that count.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc

from services.common.auth import METADATA_KEY
from services.gen.tandem.export.v1 import export_pb2_grpc
from services.gen.tandem.identity.v1 import identity_pb2_grpc
from services.gen.tandem.ingest.v1 import ingest_pb2_grpc
from services.gen.tandem.review.v1 import review_pb2_grpc
from services.gen.tandem.stats.v1 import stats_pb2, stats_pb2_grpc
from services.gen.tandem.workforce.v1 import workforce_pb2_grpc

# A restarting service is retried by gRPC itself, briefly: a person waiting on a page is better
# served by a clear "service down" page within a second than by a long spinner.
_RETRY = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)
STATS_SERVICES = ("ingest", "scorer", "review", "export")
Metadata = tuple[tuple[str, str], ...]


def bearer(token: str) -> Metadata:
    return ((METADATA_KEY, f"Bearer {token}"),)


def channel_credentials(ca_file: Path | None, tls: bool) -> grpc.ChannelCredentials | None:
    """TLS towards the services when they serve it (the same TANDEM_TLS_* environment)."""
    if ca_file is not None:
        return grpc.ssl_channel_credentials(root_certificates=ca_file.read_bytes())
    return grpc.ssl_channel_credentials() if tls else None


class Backends:
    def __init__(self, targets: Mapping[str, str], credentials: grpc.ChannelCredentials | None) -> None:
        self._targets = dict(targets)
        opts = [("grpc.service_config", _RETRY), ("grpc.max_receive_message_length", 64 << 20)]
        self._channels = {
            name: (
                grpc.aio.insecure_channel(target, options=opts)
                if credentials is None
                else grpc.aio.secure_channel(target, credentials, options=opts)
            )
            for name, target in targets.items()
        }
        self.ingest = ingest_pb2_grpc.IngestServiceStub(self._channels["ingest"])
        self.review = review_pb2_grpc.ReviewServiceStub(self._channels["review"])
        self.export = export_pb2_grpc.ExportServiceStub(self._channels["export"])
        self.report = export_pb2_grpc.ReportServiceStub(self._channels["export"])
        self.identity = identity_pb2_grpc.IdentityServiceStub(self._channels["identity"])
        # The review service serves the workforce too (pools, people, gold, quality).
        self.workforce = workforce_pb2_grpc.WorkforceServiceStub(self._channels["review"])
        self.stats_of = {
            name: stats_pb2_grpc.StatsServiceStub(self._channels[name]) for name in STATS_SERVICES
        }

    async def stats(self, project_id: str, call: Mapping[str, Any]) -> stats_pb2.ProjectStats:
        """Every service's part of the project's stats, merged into one message. `call` holds the
        per-call keyword arguments (metadata, timeout)."""
        request = stats_pb2.GetProjectStatsRequest(project_id=project_id)
        parts = await asyncio.gather(
            *(stub.GetProjectStats(request, **call) for stub in self.stats_of.values())
        )
        merged = stats_pb2.ProjectStats(project_id=project_id)
        for part in parts:
            merged.MergeFrom(part)
        return merged

    def service_named_in(self, text: str) -> str:
        """Which service a connection error is about, from the address in its debug text."""
        for name, target in self._targets.items():
            if target and target in text:
                return name
        return ""

    async def close(self) -> None:
        await asyncio.gather(*(ch.close(None) for ch in self._channels.values()))
