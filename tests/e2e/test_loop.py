"""The whole loop through all five services, over gRPC and JetStream, on real servers."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
import pytest

from services.cli.client import Clients
from services.cli.commands import export
from services.cli.stack import Stack
from services.cli.workforce import Workforce, WorkforceConfig
from services.common.fewshot import FewShotStore
from services.gen.tandem.ingest.v1 import ingest_pb2
from services.gen.tandem.projects.v1 import projects_pb2
from tests.e2e.corpus import LABELS, make_corpus

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

PROJECT = "e2e-topics"


def _raw(row: dict[str, str], **extra: object) -> ingest_pb2.RawItem:
    return ingest_pb2.RawItem(external_id=row["id"], text=row["text"].encode(), **extra)  # type: ignore[arg-type]


async def _wait_until(predicate: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


async def test_every_item_is_exported_exactly_once_through_faults(stack: Stack, tmp_path: Path) -> None:
    corpus = make_corpus(per_label=36)  # 108 items
    first, second = corpus[:80], corpus[80:]
    gold = {r["id"]: r["label"] for r in corpus}

    async with Clients(stack.targets, token=stack.admin_token) as clients:
        project = projects_pb2.Project(
            project_id=PROJECT,
            labels=[projects_pb2.LabelDef(name=k, description=v) for k, v in LABELS.items()],
            target_accuracy=0.9,
        )
        await clients.ingest.CreateProject(ingest_pb2.CreateProjectRequest(project=project), timeout=30)

        # -- validation at the edge: bad items get a reason, the rest of the batch goes in --------
        bad = [
            ingest_pb2.RawItem(external_id="dup", text=first[0]["text"].encode()),
            ingest_pb2.RawItem(external_id="bad-utf8", text=b"caf\xc3 au lait"),
            ingest_pb2.RawItem(external_id="empty", text=b"   "),
            ingest_pb2.RawItem(external_id="huge", text=b"x" * (64 * 1024 + 1)),
            ingest_pb2.RawItem(external_id="lost", text=b"a fine text", project_id="no-such-project"),
        ]
        response = await clients.ingest.SubmitBatch(
            ingest_pb2.SubmitBatchRequest(project_id=PROJECT, items=[_raw(r) for r in first] + bad),
            timeout=60,
        )
        by_id = {r.external_id: r for r in response.results}
        assert response.accepted == len(first)
        assert by_id["dup"].outcome == ingest_pb2.ITEM_OUTCOME_DUPLICATE
        assert by_id["dup"].item_id == by_id[first[0]["id"]].item_id
        assert by_id["bad-utf8"].outcome == ingest_pb2.ITEM_OUTCOME_REJECTED
        assert "UTF-8" in by_id["bad-utf8"].reason
        assert by_id["empty"].reason == "text is empty"
        assert "limit is 65,536" in by_id["huge"].reason
        assert "unknown project" in by_id["lost"].reason
        assert response.duplicates == 1 and response.rejected == 4

        # -- a poison message on the bus is dead-lettered, not retried forever ------------------
        nc = await nats.connect(stack.nats_url)
        try:
            js = nc.jetstream()
            dlq = await js.subscribe("tandem.dlq.inference", stream="TANDEM_DLQ")
            await js.publish("tandem.items.v1.ingested", b"\xff\xfe not a protobuf")
            dead = await dlq.next_msg(timeout=30)
            assert dead.headers is not None
            assert "permanent" in dead.headers["Tandem-Error"]
            assert dead.data == b"\xff\xfe not a protobuf"
        finally:
            await nc.close()

        # -- people label while services crash and come back ------------------------------------
        workforce = Workforce(
            clients,
            gold,
            WorkforceConfig(project_id=PROJECT, annotators=3, error_rate=0.0, seconds_per_item=0.02),
        )
        stop = asyncio.Event()

        async def complete() -> bool:
            s = await clients.stats(PROJECT)
            return s.ingest.items == len(corpus) and s.export.finalized == len(corpus)

        people = asyncio.create_task(workforce.run(complete, stop))
        await _wait_until(lambda: _labels_done(clients, 10), 120, "the first human labels")
        stack.processes["scorer"].kill()
        stack.processes["export"].kill()
        # Items arrive while the scorer and export are down; nothing may be lost.
        response = await clients.ingest.SubmitBatch(
            ingest_pb2.SubmitBatchRequest(project_id=PROJECT, items=[_raw(r) for r in second]), timeout=60
        )
        assert response.accepted == len(second)
        await asyncio.to_thread(stack.processes["scorer"].restart)
        await asyncio.to_thread(stack.processes["export"].restart)
        stack.processes["inference"].terminate()  # graceful drain mid-stream
        await asyncio.to_thread(stack.processes["inference"].restart)
        try:
            await asyncio.wait_for(people, timeout=180)
        finally:
            stop.set()

        # -- the export holds every accepted item exactly once ----------------------------------
        info, path = await export(clients, PROJECT, tmp_path / "out.jsonl")
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        by_item = {r["item_id"]: r["id"] for r in rows}
        ids = [r["id"] for r in rows]
        assert len(ids) == len(set(ids)), "an item was exported twice"
        assert set(ids) == set(gold), "exported items differ from ingested items"
        assert info.rows == len(corpus) and info.pending == 0
        sources = {r["source"] for r in rows}
        assert sources <= {"auto", "human"} and "human" in sources
        for r in rows:
            assert r["label"] in LABELS and r["text"] and r["item_id"]
            if r["source"] == "human":
                assert r["annotator_ids"] and r["label"] == gold[r["id"]]  # error rate 0
        stats = await clients.stats(PROJECT)
        assert stats.scorer.predicted == len(corpus)

        # -- the scorer shares demonstrations from human labels with LLM backends ----------------
        nc = await nats.connect(stack.nats_url)
        try:
            demos = await FewShotStore(nc.jetstream()).get(PROJECT)
        finally:
            await nc.close()
        assert demos is not None and demos.demos
        assert all(gold[by_item[d.item_id]] == d.label for d in demos.demos)

    url = f"http://127.0.0.1:{stack.processes['ingest'].http_port}/metrics"
    metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read())
    assert b'tandem_ingest_items_total{outcome="accepted"}' in metrics


async def _labels_done(clients: Clients, n: int) -> bool:
    return (await clients.stats(PROJECT)).review.done >= n
