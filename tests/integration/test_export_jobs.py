"""Exports as jobs on real servers: state and progress, versions, checksums, filters, the list.

Items and final labels are published on the bus as the other services send them; the export
service (a real process over nats-server and PostgreSQL) copies them in pages of three rows, so
every job here has several pages.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import nats
import pytest

from services.cli.client import channel
from services.cli.stack import Stack
from services.common.bus.topology import EXPORT_ITEMS, EXPORT_LABELS
from services.gen.tandem.export.v1 import export_pb2, export_pb2_grpc
from services.gen.tandem.items.v1 import items_pb2
from services.gen.tandem.labels.v1 import labels_pb2
from tests.integration.bus import drained, publish

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PROJECT = "jobs"
HOUR = 3_600_000
NOW = int(time.time() * 1000)
S = labels_pb2
# (external id, source, confidence, finalized hours ago, lang)
ITEMS = [
    ("a", S.LABEL_SOURCE_AUTO, 0.97, 4, "en"),
    ("b", S.LABEL_SOURCE_AUTO, 0.60, 4, "de"),
    ("c", S.LABEL_SOURCE_HUMAN, 0.90, 3, "en"),
    ("d", S.LABEL_SOURCE_HUMAN, 0.80, 3, "de"),
    ("e", S.LABEL_SOURCE_CONSENSUS, 0.93, 2, "en"),
    ("f", S.LABEL_SOURCE_GOLD, 1.0, 2, "en"),
    ("g", S.LABEL_SOURCE_MODEL, 0.55, 1, "de"),
    ("h", S.LABEL_SOURCE_MODEL, 0.70, 1, "en"),
]


@pytest.fixture
async def stack(tmp_path: Path, nats_url: str, database_url: str) -> AsyncIterator[Stack]:
    env = {"TANDEM_EXPORT_PAGE_ROWS": "3", "TANDEM_EXPORT_WAIT_POLL_SECONDS": "0.05"}
    stack = Stack(
        tmp_path / "state", nats_url=nats_url, database_url=database_url, extra_env=env, services=("export",)
    )
    await asyncio.to_thread(stack.start)
    try:
        yield stack
    finally:
        await asyncio.to_thread(stack.stop)


def _final(
    item_id: str, source: labels_pb2.LabelSource.ValueType, conf: float, at_ms: int
) -> labels_pb2.FinalLabel:
    return labels_pb2.FinalLabel(
        item_id=item_id, label="pos", source=source, confidence=conf, finalized_unix_ms=at_ms, method="single"
    )


async def _publish(
    stack: Stack, project: str, items: list[tuple[str, str, str]], finals: list[labels_pb2.FinalLabel]
) -> None:
    """(item id, external id, lang) items and their final labels, on the bus and materialized."""
    nc = await nats.connect(stack.nats_url, connect_timeout=5)
    try:
        js = nc.jetstream()
        before_items = (await js.consumer_info(EXPORT_ITEMS.stream, EXPORT_ITEMS.name)).delivered.consumer_seq
        before_labels = (
            await js.consumer_info(EXPORT_LABELS.stream, EXPORT_LABELS.name)
        ).delivered.consumer_seq
        if items:
            await publish(
                js,
                items_pb2.ItemBatch(
                    batch_id=str(uuid.uuid4()),
                    project_id=project,
                    items=[
                        items_pb2.Item(
                            item_id=iid,
                            project_id=project,
                            external_id=ext,
                            text=f"text of {ext}",
                            metadata={"lang": lang, "n": ext},
                            ingested_unix_ms=NOW - 10 * HOUR,
                        )
                        for iid, ext, lang in items
                    ],
                ),
            )
            await drained(js, EXPORT_ITEMS, delivered=before_items + 1)
        await publish(
            js, labels_pb2.FinalLabelBatch(batch_id=str(uuid.uuid4()), project_id=project, labels=finals)
        )
        await drained(js, EXPORT_LABELS, delivered=before_labels + 1)
    finally:
        await nc.close()


@pytest.fixture
async def labeled(stack: Stack) -> dict[str, str]:
    """The items, labeled; external id → item id."""
    ids = {ext: str(uuid.uuid4()) for ext, *_ in ITEMS}
    await _publish(
        stack,
        PROJECT,
        [(ids[ext], ext, lang) for ext, _, _, _, lang in ITEMS],
        [_final(ids[ext], src, conf, NOW - hours * HOUR) for ext, src, conf, hours, _ in ITEMS],
    )
    return ids


@pytest.fixture
async def stub(stack: Stack) -> AsyncIterator[export_pb2_grpc.ExportServiceAsyncStub]:
    async with channel(stack.targets["export"], stack.admin_token) as ch:
        yield export_pb2_grpc.ExportServiceStub(ch)


async def _ready(stub: export_pb2_grpc.ExportServiceAsyncStub, export_id: str) -> export_pb2.ExportInfo:
    deadline = time.monotonic() + 30
    while True:
        info = await stub.GetExport(export_pb2.GetExportRequest(export_id=export_id), timeout=10)
        if info.state != export_pb2.EXPORT_STATE_BUILDING:
            return info
        assert time.monotonic() < deadline, f"export {export_id} still building"
        await asyncio.sleep(0.05)


async def _jsonl(stub: export_pb2_grpc.ExportServiceAsyncStub, export_id: str) -> bytes:
    request = export_pb2.StreamExportRequest(export_id=export_id)
    return b"".join([c.jsonl async for c in stub.StreamExport(request, timeout=30)])


async def _create(
    stub: export_pb2_grpc.ExportServiceAsyncStub,
    keep: export_pb2.ExportFilter | None = None,
    project: str = PROJECT,
) -> export_pb2.ExportInfo:
    return await stub.CreateExport(
        export_pb2.CreateExportRequest(project_id=project, filter=keep), timeout=10
    )


async def test_a_job_builds_then_is_ready_with_versions_and_checksums(
    stack: Stack, stub: export_pb2_grpc.ExportServiceAsyncStub, labeled: dict[str, str]
) -> None:
    first = await _create(stub)
    assert first.state == export_pb2.EXPORT_STATE_BUILDING
    assert (first.version, first.rows_total, first.rows) == (1, len(ITEMS), len(ITEMS))
    assert first.expires_unix_ms > first.created_unix_ms  # the default retention
    ready = await _ready(stub, first.export_id)
    assert ready.state == export_pb2.EXPORT_STATE_READY
    assert ready.rows_done == ready.rows_total == ready.rows == len(ITEMS)
    assert ready.ready_unix_ms >= ready.created_unix_ms
    assert dict(ready.rows_by_source) == {"auto": 2, "human": 2, "consensus": 1, "gold": 1, "model": 2}
    data = await _jsonl(stub, first.export_id)
    assert ready.checksum == hashlib.sha256(data).hexdigest()
    assert len(data.splitlines()) == len(ITEMS)

    # Equal data, equal checksum; the next version.
    second = await _ready(stub, (await _create(stub)).export_id)
    assert second.version == 2
    assert second.checksum == ready.checksum

    # A stronger label for one item: different data, different checksum.
    await _publish(stack, PROJECT, [], [_final(labeled["a"], S.LABEL_SOURCE_GOLD, 1.0, NOW)])
    third = await _ready(stub, (await _create(stub)).export_id)
    assert third.version == 3
    assert third.checksum != ready.checksum
    assert third.checksum == hashlib.sha256(await _jsonl(stub, third.export_id)).hexdigest()

    # The list: newest version first, only this project's.
    other = await _ready(stub, (await _create(stub, project="other")).export_id)
    assert other.version == 1 and other.rows == 0
    listed = await stub.ListExports(export_pb2.ListExportsRequest(project_id=PROJECT), timeout=10)
    assert [e.version for e in listed.exports] == [3, 2, 1]
    assert [e.export_id for e in listed.exports] == [third.export_id, second.export_id, first.export_id]
    assert all(e.state == export_pb2.EXPORT_STATE_READY for e in listed.exports)
    limited = await stub.ListExports(export_pb2.ListExportsRequest(project_id=PROJECT, limit=1), timeout=10)
    assert [e.version for e in limited.exports] == [3]


F = export_pb2.ExportFilter


@pytest.mark.parametrize(
    ("keep", "expected"),
    [
        (F(sources=["human", "gold"]), "cdf"),
        # 0.9 is kept at 0.9: compared as the stored real, not as a double.
        (F(min_confidence=0.9), "acef"),
        (F(metadata={"lang": "de"}), "bdg"),
        (F(certified_only=True), "abcdef"),
        (
            F(finalized_after_unix_ms=NOW - 3 * HOUR - 1000, finalized_before_unix_ms=NOW - HOUR - 1000),
            "cdef",
        ),
        (F(sources=["auto", "model"], metadata={"lang": "en"}, min_confidence=0.65), "ah"),
    ],
    ids=["sources", "min_confidence", "metadata", "certified_only", "finalized_range", "combined"],
)
async def test_each_filter_keeps_exactly_its_rows(
    stub: export_pb2_grpc.ExportServiceAsyncStub,
    labeled: dict[str, str],
    keep: export_pb2.ExportFilter,
    expected: str,
) -> None:
    created = await _create(stub, keep)
    assert created.rows_total == len(expected)
    info = await _ready(stub, created.export_id)
    lines = [json.loads(line) for line in (await _jsonl(stub, created.export_id)).splitlines()]
    assert sorted(line["id"] for line in lines) == list(expected)
    assert info.rows == info.rows_done == info.rows_total == len(expected)
    assert info.filter == keep


@pytest.mark.parametrize(
    ("keep", "says"),
    [
        (F(sources=["robot"]), "unknown sources"),
        (F(min_confidence=1.5), "min_confidence"),
        (F(min_confidence=-0.1), "min_confidence"),
        (F(finalized_after_unix_ms=NOW, finalized_before_unix_ms=NOW - HOUR), "finalized_after"),
        (F(metadata={"": "x"}), "metadata"),
    ],
)
async def test_an_invalid_filter_is_refused(
    stub: export_pb2_grpc.ExportServiceAsyncStub, keep: export_pb2.ExportFilter, says: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _create(stub, keep)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in (err.value.details() or "")


async def test_a_stream_of_a_building_export_waits_for_all_of_it(
    stack: Stack, stub: export_pb2_grpc.ExportServiceAsyncStub
) -> None:
    # 600 rows in pages of 3: the job is still building when the stream asks.
    ids = [str(uuid.uuid4()) for _ in range(600)]
    await _publish(
        stack,
        "bulk",
        [(iid, f"x{n}", "en") for n, iid in enumerate(ids)],
        [_final(iid, S.LABEL_SOURCE_AUTO, 0.9, NOW) for iid in ids],
    )
    created = await _create(stub, project="bulk")
    assert created.state == export_pb2.EXPORT_STATE_BUILDING
    data = await _jsonl(stub, created.export_id)
    lines = [json.loads(line) for line in data.splitlines()]
    assert sorted(line["item_id"] for line in lines) == sorted(ids)
    # Item order, as the checksum reads it.
    assert [line["item_id"] for line in lines] == sorted(ids)
    info = await _ready(stub, created.export_id)
    assert info.rows_done == info.rows_total == 600
    assert info.checksum == hashlib.sha256(data).hexdigest()
