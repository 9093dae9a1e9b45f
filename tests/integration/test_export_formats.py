"""Every export format on real servers, read back by the library that consumes it.

Items, people's own labels and final labels are published on the bus as the other services send
them; the export service (a real process over nats-server and PostgreSQL) materializes them, and
each format is created and streamed over gRPC.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import nats
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest

from services.cli.client import channel
from services.cli.stack import Stack
from services.common.bus.topology import EXPORT_ITEMS, EXPORT_LABELS, EXPORT_RAW_LABELS
from services.export.split import group_key
from services.gen.tandem.export.v1 import export_pb2, export_pb2_grpc
from services.gen.tandem.items.v1 import items_pb2
from services.gen.tandem.labels.v1 import labels_pb2
from tests.integration.bus import drained, publish

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PROJECT = "formats"
# (external id, text, final label, people's own labels): two texts equal once normalized, and
# two equal but for digits, which a split must keep together.
ITEMS = [
    ("a", "The match ended 2-1.", "sport", [("ann-a", "sport"), ("ann-b", "tech")]),
    ("b", "the MATCH ended 2 1", "sport", [("ann-c", "sport")]),
    ("c", 'New chip, "fast"\nand cheap', "tech", [("ann-a", "tech")]),
    ("d", "Order 1234 shipped late", "business", []),
    ("e", "order 98 shipped late!", "business", [("ann-b", "business")]),
    ("f", "Ünïcode — ✓ markets rally", "business", [("ann-c", "business")]),
    ("g", "A quiet day in tech", "tech", []),
    ("h", "Team wins the cup", "sport", [("ann-a", "sport")]),
]


@pytest.fixture
async def stack(tmp_path: Path, nats_url: str, database_url: str) -> AsyncIterator[Stack]:
    # A short sweep period, so the retention test sees a sweep within a second.
    env = {"TANDEM_EXPORT_RETENTION_HOURS": "1", "TANDEM_EXPORT_SWEEP_SECONDS": "0.2"}
    stack = Stack(
        tmp_path / "state", nats_url=nats_url, database_url=database_url, extra_env=env, services=("export",)
    )
    await asyncio.to_thread(stack.start)
    try:
        yield stack
    finally:
        await asyncio.to_thread(stack.stop)


@pytest.fixture
async def labeled(stack: Stack) -> dict[str, str]:
    """The items on the bus, labeled; external id → item id."""
    ids = {ext: str(uuid.uuid4()) for ext, *_ in ITEMS}
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
                        item_id=ids[ext],
                        project_id=PROJECT,
                        external_id=ext,
                        text=text,
                        metadata={"lang": "en", "n": ext},
                        ingested_unix_ms=now - 60_000,
                    )
                    for ext, text, _, _ in ITEMS
                ],
            ),
        )
        raw = [
            labels_pb2.HumanLabel(
                item_id=ids[ext],
                task_id=f"{ext}-{who}",
                label=lb,
                annotator_id=who,
                labeled_unix_ms=now - 10_000 + i,
                reason="uncertain",
                pool_id="north",
                pending=len(people) > 1,
            )
            for ext, _, _, people in ITEMS
            for i, (who, lb) in enumerate(people)
        ]
        await publish(
            js, labels_pb2.HumanLabelBatch(batch_id=str(uuid.uuid4()), project_id=PROJECT, labels=raw)
        )
        finals = [
            labels_pb2.FinalLabel(
                item_id=ids[ext],
                label=label,
                source=labels_pb2.LABEL_SOURCE_HUMAN if people else labels_pb2.LABEL_SOURCE_AUTO,
                confidence=0.9 if people else 0.97,
                model_version="" if people else "m-7",
                annotator_ids=[who for who, _ in people],
                finalized_unix_ms=now - 5_000,
                method="single",
            )
            for ext, _, label, people in ITEMS
        ]
        await publish(
            js, labels_pb2.FinalLabelBatch(batch_id=str(uuid.uuid4()), project_id=PROJECT, labels=finals)
        )
        await drained(js, EXPORT_ITEMS, delivered=1)
        await drained(js, EXPORT_RAW_LABELS, delivered=1)
        await drained(js, EXPORT_LABELS, delivered=1)
    finally:
        await nc.close()
    return ids


async def _export(
    stack: Stack, fmt: export_pb2.ExportFormat.ValueType, split: export_pb2.Split | None = None
) -> tuple[export_pb2.ExportInfo, list[export_pb2.ExportChunk]]:
    async with channel(stack.targets["export"], stack.admin_token) as ch:
        stub = export_pb2_grpc.ExportServiceStub(ch)
        info = await stub.CreateExport(
            export_pb2.CreateExportRequest(project_id=PROJECT, format=fmt, split=split), timeout=10
        )
        request = export_pb2.StreamExportRequest(export_id=info.export_id, file_stem="news")
        chunks = [c async for c in stub.StreamExport(request, timeout=10)]
        assert info.rows == len(ITEMS)
        # Exports are jobs: the split's counts are known once it is ready (the stream waited).
        info = await stub.GetExport(export_pb2.GetExportRequest(export_id=info.export_id), timeout=10)
    assert info.state == export_pb2.EXPORT_STATE_READY
    return info, chunks


def _files(chunks: list[export_pb2.ExportChunk]) -> dict[str, bytes]:
    files: dict[str, bytearray] = defaultdict(bytearray)
    sums = {}
    for c in chunks:
        if c.sha256:
            sums[c.file] = c.sha256
        else:
            files[c.file].extend(c.data)
    assert sum(c.rows for c in chunks) == len(ITEMS)
    # The stream closes with each file's digest.
    assert sums == {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    return {name: bytes(data) for name, data in files.items()}


def _people(ext: str) -> list[tuple[str, str]]:
    return next(people for e, _, _, people in ITEMS if e == ext)


async def test_jsonl_stays_as_it_was(stack: Stack, labeled: dict[str, str]) -> None:
    info, chunks = await _export(stack, export_pb2.EXPORT_FORMAT_UNSPECIFIED)
    assert info.format == export_pb2.EXPORT_FORMAT_JSONL
    assert all(not c.data and not c.file for c in chunks)
    data = b"".join(c.jsonl for c in chunks)
    assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest()
    lines = [json.loads(line) for line in data.decode().splitlines()]
    assert sorted(line["id"] for line in lines) == sorted(labeled)
    assert all("split" not in line for line in lines)


async def test_csv(stack: Stack, labeled: dict[str, str]) -> None:
    info, chunks = await _export(stack, export_pb2.EXPORT_FORMAT_CSV)
    assert info.format == export_pb2.EXPORT_FORMAT_CSV
    files = _files(chunks)
    assert list(files) == ["news.csv"]
    rows = list(csv.DictReader(io.StringIO(files["news.csv"].decode(), newline="")))
    assert sorted(r["id"] for r in rows) == sorted(labeled)
    for r in rows:
        assert r["item_id"] == labeled[r["id"]]
        assert r["text"] == next(text for ext, text, _, _ in ITEMS if ext == r["id"])
        assert [(x["annotator_id"], x["label"]) for x in json.loads(r["raw_labels"])] == _people(r["id"])
        assert json.loads(r["metadata"]) == {"lang": "en", "n": r["id"]}


async def test_parquet_and_its_card(stack: Stack, labeled: dict[str, str]) -> None:
    _, chunks = await _export(stack, export_pb2.EXPORT_FORMAT_PARQUET)
    files = _files(chunks)
    assert sorted(files) == ["README.md", "news.parquet"]
    table = pq.read_table(io.BytesIO(files["news.parquet"]))
    rows = table.to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(labeled)
    for r in rows:
        assert [(x["annotator_id"], x["label"]) for x in r["raw_labels"]] == _people(r["id"])
        assert json.loads(r["metadata"])["n"] == r["id"]
    assert len(table.to_pandas()) == len(ITEMS)
    card = files["README.md"].decode()
    assert '    path: "news.parquet"' in card and "- text-classification" in card
    assert "| business | 3 |" in card and "| auto | 2 |" in card


async def test_label_studio(stack: Stack, labeled: dict[str, str]) -> None:
    _, chunks = await _export(stack, export_pb2.EXPORT_FORMAT_LABEL_STUDIO)
    files = _files(chunks)
    tasks = json.loads(files["news.json"])
    assert sorted(t["data"]["id"] for t in tasks) == sorted(labeled)
    for task in tasks:
        people = _people(task["data"]["id"])
        assert [(a["completed_by"], a["result"][0]["value"]["choices"]) for a in task["annotations"]] == [
            (who, [lb]) for who, lb in people
        ]
        (prediction,) = task["predictions"]
        assert prediction["result"][0]["type"] == "choices"
        assert prediction["score"] == pytest.approx(0.9 if people else 0.97)


async def test_parquet_split_is_a_file_per_split_without_leaks(stack: Stack, labeled: dict[str, str]) -> None:
    split = export_pb2.Split(train=0.5, validation=0.25, test=0.25, seed=11)
    info, chunks = await _export(stack, export_pb2.EXPORT_FORMAT_PARQUET, split)
    assert sum(info.rows_by_split.values()) == len(ITEMS)
    files = _files(chunks)
    assert set(files) - {"README.md"} == {f"news-{s}.parquet" for s in info.rows_by_split}
    where: dict[str, set[str]] = defaultdict(set)
    for name, data in files.items():
        if name.endswith(".parquet"):
            for r in pq.read_table(io.BytesIO(data)).to_pylist():
                assert name == f"news-{r['split']}.parquet"
                where[group_key(r["text"])].add(r["split"])
    assert sum(info.rows_by_split.values()) == len(ITEMS)
    assert all(len(splits) == 1 for splits in where.values()), where
    # The JSONL of a split export carries the split on every line.
    _, jsonl = await _export(stack, export_pb2.EXPORT_FORMAT_JSONL, split)
    lines = [json.loads(line) for line in b"".join(c.jsonl for c in jsonl).decode().splitlines()]
    assert {line["split"] for line in lines} <= {"train", "validation", "test"}


async def test_bad_split_is_refused(stack: Stack) -> None:
    async with channel(stack.targets["export"], stack.admin_token) as ch:
        stub = export_pb2_grpc.ExportServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateExport(
                export_pb2.CreateExportRequest(
                    project_id=PROJECT, split=export_pb2.Split(train=0.5, test=0.3)
                ),
                timeout=10,
            )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_snapshots_past_retention_are_deleted(stack: Stack, labeled: dict[str, str]) -> None:
    old, _ = await _export(stack, export_pb2.EXPORT_FORMAT_JSONL)
    fresh, _ = await _export(stack, export_pb2.EXPORT_FORMAT_CSV)
    conn = await asyncpg.connect(stack.database_url)
    try:
        await conn.execute(
            "UPDATE export.exports SET created_at = now() - interval '2 hours' WHERE export_id = $1",
            uuid.UUID(old.export_id),
        )
        deadline = time.monotonic() + 10
        while await conn.fetchval(
            "SELECT count(*) FROM export.exports WHERE export_id = $1", uuid.UUID(old.export_id)
        ):
            assert time.monotonic() < deadline, "the sweeper did not delete the old snapshot"
            await asyncio.sleep(0.1)
        left = await conn.fetch("SELECT DISTINCT export_id::text AS e FROM export.export_rows")
    finally:
        await conn.close()
    assert [r["e"] for r in left] == [fresh.export_id]
    async with channel(stack.targets["export"], stack.admin_token) as ch:
        stub = export_pb2_grpc.ExportServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetExport(export_pb2.GetExportRequest(export_id=old.export_id), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert (await stub.GetExport(export_pb2.GetExportRequest(export_id=fresh.export_id), timeout=10)).rows
