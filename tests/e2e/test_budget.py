"""A human budget and a random control arm, through all five services."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.cli.client import Clients
from services.cli.commands import export
from services.cli.stack import Stack
from services.cli.workforce import Workforce, WorkforceConfig
from services.gen.tandem.ingest.v1 import ingest_pb2
from services.gen.tandem.projects.v1 import projects_pb2
from tests.e2e.conftest import SCORER_ENV
from tests.e2e.corpus import LABELS, make_corpus

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

PROJECT = "e2e-budget"
BUDGET = 15
ANNOTATORS = 2


@pytest.fixture
async def stack(tmp_path: Path, nats_url: str, database_url: str) -> AsyncIterator[Stack]:
    # A high bar: the scorer cannot reach it with 15 labels, so the budget decides the rest.
    env = {**SCORER_ENV, "TANDEM_SCORER_MIN_HUMAN_LABELS": "40"}
    s = Stack(tmp_path / "state", nats_url=nats_url, database_url=database_url, extra_env=env)
    await asyncio.to_thread(s.start)
    try:
        yield s
    finally:
        await asyncio.to_thread(s.stop)


async def test_spent_budget_finalizes_the_rest_below_target(stack: Stack, tmp_path: Path) -> None:
    corpus = make_corpus(per_label=20)
    gold = {r["id"]: r["label"] for r in corpus}
    async with Clients(stack.targets, token=stack.admin_token) as clients:
        project = projects_pb2.Project(
            project_id=PROJECT,
            labels=[projects_pb2.LabelDef(name=k, description=v) for k, v in LABELS.items()],
            human_budget_items=BUDGET,
            control_rate=0.2,
        )
        await clients.ingest.CreateProject(ingest_pb2.CreateProjectRequest(project=project), timeout=30)
        await clients.ingest.SubmitBatch(
            ingest_pb2.SubmitBatchRequest(
                project_id=PROJECT,
                items=[ingest_pb2.RawItem(external_id=r["id"], text=r["text"].encode()) for r in corpus],
            ),
            timeout=60,
        )

        async def complete() -> bool:
            s = await clients.stats(PROJECT)
            return s.ingest.items == len(corpus) and s.export.finalized == len(corpus)

        workforce = Workforce(
            clients,
            gold,
            WorkforceConfig(project_id=PROJECT, annotators=ANNOTATORS, error_rate=0.0, seconds_per_item=0.2),
        )
        await asyncio.wait_for(workforce.run(complete), timeout=180)

        _, path = await export(clients, PROJECT, tmp_path / "budget.jsonl")
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert sorted(r["id"] for r in rows) == sorted(gold)
        human = [r for r in rows if r["source"] == "human"]
        below = [r for r in rows if r["below_target"]]
        # Tasks leased before the withdrawal reached review may still come back labeled: the
        # budget holds to within what the annotators had in hand.
        assert BUDGET <= len(human) <= BUDGET + 2 * ANNOTATORS
        assert below and all(r["source"] == "model" for r in below)
        assert not any(r["below_target"] for r in rows if r["source"] != "model")
        assert len(human) + len(below) == len(rows)  # nothing met the target without people
        # What was waiting is finalized by a model refit on every label of the budget, not by the
        # model of the last refit before the budget ran out (a few labels short).
        fitted = max(int(r["model_version"].rsplit("-n", 1)[1]) for r in below)
        assert fitted >= BUDGET
        # A label for a task that was already leased can still turn a below-target item into a
        # human one after the export; the scorer's count settles on the export's.
        stats = await clients.stats(PROJECT)
        for _ in range(50):
            if stats.scorer.below_target == len(below):
                break
            await asyncio.sleep(0.2)
            stats = await clients.stats(PROJECT)
            _, path = await export(clients, PROJECT, tmp_path / "budget.jsonl")
            below = [json.loads(line) for line in path.read_text().splitlines()]
            below = [r for r in below if r["below_target"]]
        assert stats.scorer.below_target == len(below)
        assert stats.scorer.human_budget == BUDGET
        assert stats.scorer.control > 0
        # The budget ran out before the target was certified: what is certified is said, not
        # left silent — in the stats and beside the export. Unchecked model labels count as
        # possibly wrong, so the certified accuracy is at most the share people labeled.
        assert not stats.scorer.certified and stats.scorer.guarantee == "dataset"
        assert 0.0 < stats.scorer.certified_accuracy <= (len(rows) - len(below)) / len(rows)
        certificate = json.loads((tmp_path / "budget.certificate.json").read_text())
        assert certificate["certified"] is False and certificate["delta"] == pytest.approx(0.05)
        assert certificate["certified_accuracy"] == pytest.approx(stats.scorer.certified_accuracy)
