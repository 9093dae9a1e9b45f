"""`python -m services.review`: the annotators' task queue and the workforce."""

from __future__ import annotations

from services.common.bus.topology import REVIEW_ITEMS, REVIEW_TASKS
from services.common.lifecycle import Runtime, run
from services.common.projects import ProjectDirectory
from services.gen.tandem.review.v1 import review_pb2_grpc
from services.gen.tandem.stats.v1 import stats_pb2_grpc
from services.gen.tandem.workforce.v1 import workforce_pb2_grpc
from services.review.handlers import (
    ItemConsumer,
    ReviewDesk,
    ReviewServicer,
    ReviewStatsServicer,
    TaskConsumer,
)
from services.review.repo import SCHEMA
from services.review.settings import ReviewSettings
from services.review.workforce import WorkforceServicer


def main() -> None:
    settings = ReviewSettings()

    async def setup(rt: Runtime) -> None:
        relay = rt.add_outbox(SCHEMA)
        projects = ProjectDirectory(rt.js)
        desk = ReviewDesk(rt.pool, relay, projects, settings)
        rt.add_worker(REVIEW_TASKS, TaskConsumer(rt.pool, projects), fetch_batch=16)
        rt.add_worker(REVIEW_ITEMS, ItemConsumer(rt.pool, projects), fetch_batch=16)
        rt.add_background(desk.lease_sweeper)
        rt.add_background(desk.consensus.loop)
        review_pb2_grpc.add_ReviewServiceServicer_to_server(ReviewServicer(desk), rt.grpc_server)
        workforce_pb2_grpc.add_WorkforceServiceServicer_to_server(
            WorkforceServicer(rt.pool, projects, desk.consensus), rt.grpc_server
        )
        stats_pb2_grpc.add_StatsServiceServicer_to_server(ReviewStatsServicer(desk), rt.grpc_server)

    run("review", settings, setup, schema=SCHEMA)


if __name__ == "__main__":
    main()
