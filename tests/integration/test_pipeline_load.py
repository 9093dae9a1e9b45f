"""The pipeline load test, small: every item submitted goes ingest → inference (replay labeler) →
scorer (human budget spent: the model's label at once) → export, exactly once, and the figures
it reports are there."""

from __future__ import annotations

import math
from pathlib import Path

import asyncpg
import pytest
from rich.console import Console

from loadtests.pipeline import PipelineOptions, run_pipeline

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

ITEMS = 1_500


async def test_every_item_reaches_the_export_once(tmp_path: Path, nats_url: str, database_url: str) -> None:
    options = PipelineOptions(
        items=ITEMS,
        batch=250,
        duration=90,
        state_dir=tmp_path / "state",
        nats_url=nats_url,
        database_url=database_url,
        ceiling_messages=200,
        quiet=True,
    )
    result = await run_pipeline(options, Console(quiet=True))

    assert result.completed
    assert result.submitted == result.accepted == ITEMS
    assert [s.stage for s in result.stages] == ["ingest", "inference", "scorer", "export"]
    for stage in [*result.stages, result.end_to_end]:
        assert stage.items == ITEMS, stage
        assert stage.items_per_s > 0, stage
        assert 0 <= stage.p50_ms <= stage.p99_ms, stage
    assert result.ceiling.publish_items_per_s > 0
    assert result.ceiling.fetch_items_per_s > 0
    assert result.ratio > 0 and math.isfinite(result.ratio)
    assert result.samples and "inference" in result.samples[-1].lag
    assert {p.name for p in result.processes} >= {"ingest", "inference", "scorer", "review", "export"}

    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS items, count(f.item_id) AS finals, count(DISTINCT f.item_id) AS distinct_finals,"
            " count(*) FILTER (WHERE f.source = 'model') AS by_model"
            " FROM ingest.items i LEFT JOIN export.final_labels f USING (item_id) WHERE i.project_id = $1",
            result.project_id,
        )
        exported = await conn.fetchval(
            "SELECT count(*) FROM export.final_labels WHERE project_id = $1", result.project_id
        )
    finally:
        await conn.close()
    assert row is not None
    # Every ingested item has one final label in the export, and the export holds no other.
    assert row["items"] == row["finals"] == row["distinct_finals"] == row["by_model"] == exported == ITEMS
