"""`python -m services.export`: materializes items, raw and final labels, and serves exports."""

from __future__ import annotations

from services.common.bus.topology import EXPORT_ITEMS, EXPORT_LABELS, EXPORT_PREDICTIONS, EXPORT_RAW_LABELS
from services.common.lifecycle import Runtime, run
from services.common.projects import ProjectDirectory
from services.export.handlers import ExportServicer, ExportStatsServicer, Materializer, RetentionSweeper
from services.export.repo import SCHEMA
from services.export.reporting import ReportServicer
from services.export.settings import ExportSettings
from services.gen.tandem.export.v1 import export_pb2_grpc
from services.gen.tandem.stats.v1 import stats_pb2_grpc


def main() -> None:
    settings = ExportSettings()

    async def setup(rt: Runtime) -> None:
        projects = ProjectDirectory(rt.js)
        materializer = Materializer(rt.pool, projects)
        rt.add_worker(EXPORT_ITEMS, materializer.on_items, fetch_batch=16)
        rt.add_worker(EXPORT_LABELS, materializer.on_final_labels, fetch_batch=16)
        rt.add_worker(EXPORT_RAW_LABELS, materializer.on_human_labels, fetch_batch=16)
        rt.add_worker(EXPORT_PREDICTIONS, materializer.on_predictions, fetch_batch=16)
        exports = ExportServicer(rt.pool, settings, rt.auth.view)
        export_pb2_grpc.add_ExportServiceServicer_to_server(exports, rt.grpc_server)
        # Export jobs run in this process; on stop they are cancelled and marked failed.
        rt.add_background(exports.run_jobs)
        # Quality reports: the slices they flag reach the scorer through this outbox.
        reports = ReportServicer(
            rt.pool, rt.auth.view, projects, rt.add_outbox(SCHEMA), exports.snapshot, exports.find
        )
        export_pb2_grpc.add_ReportServiceServicer_to_server(reports, rt.grpc_server)
        stats_pb2_grpc.add_StatsServiceServicer_to_server(ExportStatsServicer(rt.pool), rt.grpc_server)
        rt.add_background(RetentionSweeper(rt.pool, settings).loop)

    run("export", settings, setup, schema=SCHEMA)


if __name__ == "__main__":
    main()
