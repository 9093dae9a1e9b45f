"""`python -m services.scorer`: decides which labels are accepted and which items people review."""

from __future__ import annotations

from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from services.common.bus.topology import SCORER_LABELS, SCORER_PREDICTIONS, SCORER_SLICES
from services.common.fewshot import FewShotStore
from services.common.lifecycle import Runtime, run
from services.common.projects import ProjectDirectory
from services.gen.tandem.stats.v1 import stats_pb2_grpc
from services.scorer.handlers import Scorer, ScorerStatsServicer
from services.scorer.repo import SCHEMA
from services.scorer.settings import ScorerSettings


def main() -> None:
    settings = ScorerSettings()
    # One BLAS thread: the refits are many small matrix products, and OpenBLAS threads contending
    # for a small machine made them up to 8x slower (1,000 labels: 6.1 s with 2 threads, 0.76 s
    # with one, measured on a 2-core machine).
    threadpool_limits(1)

    async def setup(rt: Runtime) -> None:
        relay = rt.add_outbox(SCHEMA)
        scorer = Scorer(rt.pool, relay, ProjectDirectory(rt.js), settings, FewShotStore(rt.js))
        rt.add_worker(SCORER_PREDICTIONS, scorer.on_predictions)
        rt.add_worker(SCORER_LABELS, scorer.on_human_labels, fetch_batch=64)
        rt.add_worker(SCORER_SLICES, scorer.on_slice_flags)
        rt.add_background(scorer.refit_loop)
        rt.add_closer(scorer.close)
        stats_pb2_grpc.add_StatsServiceServicer_to_server(ScorerStatsServicer(scorer), rt.grpc_server)

    run("scorer", settings, setup, schema=SCHEMA)


if __name__ == "__main__":
    main()
