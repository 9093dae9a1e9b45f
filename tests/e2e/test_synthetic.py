"""Synthetic items through the whole loop: ingested flagged, always sent to people, exported
flagged. The items are ingested directly here (the CPU backend cannot write text; generation
itself is tested in the vLLM tier); `tandem generate` against the CPU backend must say so."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from services.cli.client import Clients
from services.cli.commands import export
from services.cli.generate import generate_examples, synthetic_items
from services.cli.stack import Stack
from services.gen.tandem.ingest.v1 import ingest_pb2
from services.gen.tandem.projects.v1 import projects_pb2
from services.gen.tandem.review.v1 import review_pb2
from tests.e2e.corpus import LABELS, make_corpus

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

PROJECT = "e2e-synthetic"


@pytest.fixture
async def stack(tmp_path: Path, nats_url: str, database_url: str) -> AsyncIterator[Stack]:
    s = Stack(
        tmp_path / "state",
        nats_url=nats_url,
        database_url=database_url,
        extra_env={"TANDEM_DRAIN_SECONDS": "5"},
    )
    await asyncio.to_thread(s.start)
    try:
        yield s
    finally:
        await asyncio.to_thread(s.stop)


async def test_synthetic_items_are_reviewed_by_people_and_exported_flagged(
    stack: Stack, tmp_path: Path
) -> None:
    corpus = make_corpus(per_label=2)
    gold = {r["text"]: r["label"] for r in corpus}
    async with Clients(stack.targets, token=stack.admin_token) as clients:
        project = projects_pb2.Project(
            project_id=PROJECT,
            labels=[projects_pb2.LabelDef(name=k, description=v) for k, v in LABELS.items()],
        )
        await clients.ingest.CreateProject(ingest_pb2.CreateProjectRequest(project=project), timeout=30)

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await generate_examples(
                clients, stack.targets["inference"], project_id=PROJECT, label="sport", count=2
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "cannot generate text" in (refused.value.details() or "")

        items = synthetic_items([r["text"] for r in corpus], "sport", "test-generator", "h")
        response = await clients.ingest.SubmitBatch(
            ingest_pb2.SubmitBatchRequest(project_id=PROJECT, items=items), timeout=60
        )
        assert response.accepted == len(corpus)

        reasons: list[str] = []
        deadline = time.monotonic() + 120
        while len(reasons) < len(corpus) and time.monotonic() < deadline:
            try:
                task = await clients.review.NextTask(
                    review_pb2.NextTaskRequest(project_id=PROJECT), timeout=10
                )
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
                await asyncio.sleep(0.3)
                continue
            assert task.synthetic
            reasons.append(task.reason)
            await clients.review.SubmitLabel(
                review_pb2.SubmitLabelRequest(
                    task_id=task.task_id, lease_id=task.lease_id, label=gold[task.text]
                ),
                timeout=10,
            )
        assert reasons == ["synthetic"] * len(corpus)

        async def all_final() -> bool:
            return (await clients.stats(PROJECT)).export.finalized == len(corpus)

        while not await all_final():
            assert time.monotonic() < deadline, "synthetic items were not finalized"
            await asyncio.sleep(0.3)
        _, path = await export(clients, PROJECT, tmp_path / "out.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len(corpus)
    for row in rows:
        assert row["synthetic"] is True and row["source"] == "human"
        assert row["label"] == gold[row["text"]]
        assert row["metadata"]["requested_label"] == "sport"
