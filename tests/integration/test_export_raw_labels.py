"""The export on real servers carries every person's own label next to the aggregated one.

Labels are published on the bus directly, shaped as the review service sends them with overlap:
each person's label pending, then the aggregate of them (not pending, naming all its annotators)
and the final label with its aggregation method. Only people's own labels may reach the export,
and a message delivered twice must not add a label twice.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest

from services.cli.client import channel
from services.cli.stack import Stack
from services.common.bus.topology import EXPORT_ITEMS, EXPORT_LABELS, EXPORT_PREDICTIONS, EXPORT_RAW_LABELS
from services.common.projects import LabelSpec, ProjectDirectory, ProjectSpec
from services.gen.tandem.export.v1 import export_pb2, export_pb2_grpc
from services.gen.tandem.items.v1 import items_pb2
from services.gen.tandem.labels.v1 import labels_pb2
from services.gen.tandem.predictions.v1 import predictions_pb2
from tests.integration.bus import drained, publish

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PROJECT = "overlap"


@pytest.fixture
async def stack(tmp_path: Path, nats_url: str, database_url: str) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path / "state", nats_url=nats_url, database_url=database_url, services=("export",))
    await asyncio.to_thread(stack.start)
    try:
        yield stack
    finally:
        await asyncio.to_thread(stack.stop)


def _human(
    item_id: str,
    task_id: str,
    annotator_id: str,
    label: str,
    at_ms: int,
    *,
    pool_id: str = "",
    pending: bool = False,
    annotator_ids: tuple[str, ...] = (),
    suggested_label: str = "",
) -> labels_pb2.HumanLabelBatch:
    return labels_pb2.HumanLabelBatch(
        batch_id=str(uuid.uuid4()),
        project_id=PROJECT,
        labels=[
            labels_pb2.HumanLabel(
                item_id=item_id,
                task_id=task_id,
                label=label,
                annotator_id=annotator_id,
                seconds_spent=4.5,
                labeled_unix_ms=at_ms,
                reason="uncertain",
                pool_id=pool_id,
                pending=pending,
                annotator_ids=annotator_ids,
                suggested_label=suggested_label,
            )
        ],
    )


def _final(
    item_id: str,
    label: str,
    source: labels_pb2.LabelSource.ValueType,
    method: str,
    confidence: float,
    annotators: tuple[str, ...],
    at_ms: int,
) -> labels_pb2.FinalLabelBatch:
    return labels_pb2.FinalLabelBatch(
        batch_id=str(uuid.uuid4()),
        project_id=PROJECT,
        labels=[
            labels_pb2.FinalLabel(
                item_id=item_id,
                label=label,
                source=source,
                confidence=confidence,
                annotator_ids=annotators,
                finalized_unix_ms=at_ms,
                method=method,
            )
        ],
    )


async def _export(stack: Stack) -> tuple[export_pb2.ExportInfo, dict[str, dict[str, Any]]]:
    async with channel(stack.targets["export"], stack.admin_token) as ch:
        stub = export_pb2_grpc.ExportServiceStub(ch)
        info = await stub.CreateExport(export_pb2.CreateExportRequest(project_id=PROJECT), timeout=10)
        request = export_pb2.StreamExportRequest(export_id=info.export_id)
        text = b"".join([c.jsonl async for c in stub.StreamExport(request, timeout=10)]).decode()
    lines = [json.loads(line) for line in text.splitlines() if line]
    return info, {line["item_id"]: line for line in lines}


async def test_export_carries_raw_labels_and_the_aggregation(stack: Stack) -> None:
    overlap_item, single_item = str(uuid.uuid4()), str(uuid.uuid4())
    now = int(time.time() * 1000)
    nc = await nats.connect(stack.nats_url, connect_timeout=5)
    try:
        js = nc.jetstream()
        await publish(
            js,
            items_pb2.ItemBatch(
                batch_id=str(uuid.uuid4()),
                project_id=PROJECT,
                items=[
                    items_pb2.Item(
                        item_id=item_id,
                        project_id=PROJECT,
                        external_id=ext,
                        text=f"text {ext}",
                        ingested_unix_ms=now - 60_000,
                    )
                    for item_id, ext in ((overlap_item, "one"), (single_item, "two"))
                ],
            ),
        )
        # Published out of time order: the export orders raw labels by when they were given.
        # The model proposed "cat" on the overlap item's tasks; the single item's task had no proposal.
        ann_a = _human(
            overlap_item,
            "t1-a",
            "ann-a",
            "cat",
            now - 5_000,
            pool_id="north",
            pending=True,
            suggested_label="cat",
        )
        ann_b = _human(
            overlap_item,
            "t1-b",
            "ann-b",
            "dog",
            now - 9_000,
            pool_id="south",
            pending=True,
            suggested_label="cat",
        )
        # The aggregate of the two: a real label on the subject, but nobody's own.
        aggregate = _human(overlap_item, "t1-final", "", "cat", now - 4_000, annotator_ids=("ann-a", "ann-b"))
        single = _human(single_item, "t2", "ann-c", "bird", now - 3_000, pool_id="north")
        for message in (ann_a, ann_b, aggregate, single):
            await publish(js, message)
        await publish(
            js,
            _final(
                overlap_item,
                "cat",
                labels_pb2.LABEL_SOURCE_CONSENSUS,
                "dawid_skene",
                0.93,
                ("ann-a", "ann-b"),
                now - 4_000,
            ),
        )
        await publish(
            js,
            _final(
                single_item, "bird", labels_pb2.LABEL_SOURCE_HUMAN, "single", 1.0, ("ann-c",), now - 3_000
            ),
        )
        # The same person's label once more, as a redelivery after a crash before the ack would.
        await publish(js, ann_a)

        await drained(js, EXPORT_ITEMS, delivered=1)
        await drained(js, EXPORT_LABELS, delivered=2)
        await drained(js, EXPORT_RAW_LABELS, delivered=5)
    finally:
        await nc.close()

    conn = await asyncpg.connect(stack.database_url)
    try:
        stored = await conn.fetch(
            "SELECT item_id::text AS item_id, annotator_id, task_id, seconds_spent FROM export.raw_labels"
            " ORDER BY annotator_id"
        )
    finally:
        await conn.close()
    assert [(r["item_id"], r["annotator_id"], r["task_id"]) for r in stored] == [
        (overlap_item, "ann-a", "t1-a"),
        (overlap_item, "ann-b", "t1-b"),
        (single_item, "ann-c", "t2"),
    ]
    assert {r["seconds_spent"] for r in stored} == {4.5}

    info, lines = await _export(stack)
    assert (info.rows, info.pending) == (2, 0)
    assert set(lines) == {overlap_item, single_item}

    first = lines[overlap_item]
    assert [(r["annotator_id"], r["pool_id"], r["label"]) for r in first["raw_labels"]] == [
        ("ann-b", "south", "dog"),
        ("ann-a", "north", "cat"),
    ]
    assert all(
        set(r)
        == {"annotator_id", "pool_id", "label", "labeled_at", "reason", "model_label", "model_confidence"}
        for r in first["raw_labels"]
    )
    assert [r["model_label"] for r in first["raw_labels"]] == ["cat", "cat"]
    assert first["raw_labels"][0]["reason"] == "uncertain"
    assert first["raw_labels"][0]["labeled_at"] < first["raw_labels"][1]["labeled_at"]
    assert (first["label"], first["source"], first["aggregation"]) == ("cat", "consensus", "dawid_skene")
    assert first["posterior"] == pytest.approx(0.93, abs=1e-6)
    assert first["confidence"] == first["posterior"]
    assert sorted(first["annotator_ids"]) == ["ann-a", "ann-b"]

    second = lines[single_item]
    assert [(r["annotator_id"], r["pool_id"], r["label"]) for r in second["raw_labels"]] == [
        ("ann-c", "north", "bird")
    ]
    assert second["raw_labels"][0]["model_label"] == ""
    assert (second["aggregation"], second["posterior"]) == ("single", 1.0)


async def test_export_carries_the_labelers_model_prompt_and_distribution(stack: Stack) -> None:
    item_id = str(uuid.uuid4())
    now = int(time.time() * 1000)
    nc = await nats.connect(stack.nats_url, connect_timeout=5)
    try:
        js = nc.jetstream()
        labels = (LabelSpec("cat", "a cat"), LabelSpec("dog", "a dog"))
        await ProjectDirectory(js).put(ProjectSpec(PROJECT, PROJECT, labels, "", 0.95, 0.0))
        # The prediction before the item: they come on different subjects, in either order.
        prediction = predictions_pb2.PredictionBatch(
            batch_id=str(uuid.uuid4()),
            project_id=PROJECT,
            model_id="gte-small",
            prompt_hash="abc123",
            predicted_unix_ms=now,
            predictions=[predictions_pb2.Prediction(item_id=item_id, probs=[0.75, 0.25])],
        )
        await publish(js, prediction)
        await publish(js, prediction)  # a redelivery changes nothing
        item = items_pb2.Item(
            item_id=item_id, project_id=PROJECT, external_id="p1", text="purrs", ingested_unix_ms=now
        )
        await publish(js, items_pb2.ItemBatch(batch_id=str(uuid.uuid4()), project_id=PROJECT, items=[item]))
        await publish(js, _final(item_id, "cat", labels_pb2.LABEL_SOURCE_AUTO, "", 0.75, (), now))
        await drained(js, EXPORT_PREDICTIONS, delivered=2)
        await drained(js, EXPORT_ITEMS, delivered=1)
        await drained(js, EXPORT_LABELS, delivered=1)
    finally:
        await nc.close()
    _, lines = await _export(stack)
    assert lines[item_id]["labeler"] == {
        "model_id": "gte-small",
        "prompt_hash": "abc123",
        "distribution": {"cat": 0.75, "dog": 0.25},
    }
