"""`python -m services.ingest`: the ingest service."""

from __future__ import annotations

from services.common.lifecycle import Runtime, run
from services.common.projects import ProjectDirectory
from services.gen.tandem.ingest.v1 import ingest_pb2_grpc
from services.gen.tandem.stats.v1 import stats_pb2_grpc
from services.ingest.handlers import Ingestor, IngestServicer, IngestStatsServicer
from services.ingest.repo import SCHEMA
from services.ingest.settings import IngestSettings


def main() -> None:
    settings = IngestSettings()

    async def setup(rt: Runtime) -> None:
        relay = rt.add_outbox(SCHEMA)
        ingestor = Ingestor(rt.pool, relay, ProjectDirectory(rt.js), settings)
        ingest_pb2_grpc.add_IngestServiceServicer_to_server(
            IngestServicer(ingestor, settings, rt.auth.view), rt.grpc_server
        )
        stats_pb2_grpc.add_StatsServiceServicer_to_server(IngestStatsServicer(ingestor), rt.grpc_server)

    run("ingest", settings, setup, schema=SCHEMA)


if __name__ == "__main__":
    main()
