"""`python -m services.review`: the annotators' task queue."""

from __future__ import annotations

from services.common.bus.topology import REVIEW_TASKS
from services.common.lifecycle import Runtime, run
from services.common.projects import ProjectDirectory
from services.gen.tandem.review.v1 import review_pb2_grpc
from services.gen.tandem.stats.v1 import stats_pb2_grpc
from services.review.handlers import ReviewDesk, ReviewServicer, ReviewStatsServicer, TaskConsumer
from services.review.repo import SCHEMA
from services.review.settings import ReviewSettings


def main() -> None:
    settings = ReviewSettings()

    async def setup(rt: Runtime) -> None:
        relay = rt.add_outbox(SCHEMA)
        desk = ReviewDesk(rt.pool, relay, ProjectDirectory(rt.js), settings)
        rt.add_worker(REVIEW_TASKS, TaskConsumer(rt.pool), fetch_batch=16)
        rt.add_background(desk.lease_sweeper)
        review_pb2_grpc.add_ReviewServiceServicer_to_server(ReviewServicer(desk), rt.grpc_server)
        stats_pb2_grpc.add_StatsServiceServicer_to_server(ReviewStatsServicer(desk), rt.grpc_server)

    run("review", settings, setup, schema=SCHEMA)


if __name__ == "__main__":
    main()
