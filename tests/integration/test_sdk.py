"""The SDK guide's example (docs/sdk.md), run as written against a real stack, so the docs cannot rot.

Simulated annotators answer from the BBC corpus' known labels in place of the people the guide
sends to the web app. The stack takes most of a minute to start, so one test also checks the
errors and the dict path of `ingest`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.cli.access import write_token
from services.cli.bbc import BBC_LABELS, load_bbc
from services.cli.client import Clients
from services.cli.stack import Stack
from services.cli.targets import DEFAULT_PORTS, write_targets
from services.cli.workforce import Workforce, WorkforceConfig
from services.gen.tandem.ingest.v1 import ingest_pb2
from tandem import AlreadyExists, Client, NotFound, Unauthenticated

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "sdk.md"
PROJECT = "bbc-sample"  # the id the guide's example uses
# Small pools, as in tests/e2e/test_loop.py: the scorer must act within a 30-item project.
SCORER_ENV = {
    "TANDEM_SCORER_MIN_HUMAN_LABELS": "12",
    "TANDEM_SCORER_REFIT_EVERY": "4",
    "TANDEM_SCORER_REFIT_SECONDS": "0.5",
    "TANDEM_DRAIN_SECONDS": "5",
}


def guide_example() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", GUIDE.read_text(encoding="utf-8"), re.S | re.M)
    assert len(blocks) == 1, f"docs/sdk.md should hold one ```python block, found {len(blocks)}"
    return str(blocks[0])


@pytest.fixture
async def stack(
    tmp_path: Path, nats_url: str, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Stack]:
    state = tmp_path / "state"
    s = Stack(state, nats_url=nats_url, database_url=database_url, extra_env=SCORER_ENV)
    await asyncio.to_thread(s.start)
    try:
        # What `tandem up` leaves for the CLI (and so for `Client()`): addresses and a token.
        write_targets(state, s.targets)
        write_token(state, s.admin_token)
        monkeypatch.setenv("TANDEM_STATE_DIR", str(state))
        monkeypatch.delenv("TANDEM_TOKEN", raising=False)
        for name in DEFAULT_PORTS:
            monkeypatch.delenv(f"TANDEM_{name.upper()}_TARGET", raising=False)
        yield s
    finally:
        await asyncio.to_thread(s.stop)


async def _project_exists(clients: Clients, example: asyncio.Future[Any], within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and not example.done():
        try:
            await clients.ingest.GetProject(ingest_pb2.GetProjectRequest(project_id=PROJECT), timeout=5)
            return
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        await asyncio.sleep(0.2)
    if example.done():
        example.result()  # the example's own error, if it failed before creating the project
    raise AssertionError(f"the example did not create project {PROJECT} within {within:.0f}s")


async def test_the_guide_example_labels_and_exports_every_item(stack: Stack) -> None:
    gold = {item.id: item.label for item in load_bbc()[::75]}
    assert len(gold) == 30 and set(gold.values()) == set(BBC_LABELS)
    code = compile(guide_example(), str(GUIDE), "exec")
    scope: dict[str, Any] = {"__name__": "__sdk_guide__"}
    # The example blocks (it is synchronous, as in a notebook): it runs in a thread while the
    # simulated people work on this loop.
    example = asyncio.ensure_future(asyncio.to_thread(exec, code, scope))

    async with Clients(stack.targets, token=stack.admin_token) as clients:
        await _project_exists(clients, example, within=60)
        workforce = Workforce(
            clients,
            gold,
            WorkforceConfig(project_id=PROJECT, annotators=3, error_rate=0.0, seconds_per_item=0.0),
        )
        stop = asyncio.Event()

        async def example_finished() -> bool:
            return example.done()

        people = asyncio.create_task(workforce.run(example_finished, stop))
        try:
            await asyncio.wait_for(asyncio.shield(example), timeout=180)
        finally:
            stop.set()
            await asyncio.gather(people, return_exceptions=True)
    assert people.exception() is None

    summary, status, labels = scope["summary"], scope["status"], scope["labels"]
    assert scope["project"].project_id == PROJECT
    assert (summary.accepted, summary.duplicates, summary.rejected) == (30, 0, 0)
    assert status.items == 30 and status.finalized == 30 and status.done
    ids = list(labels["id"])
    assert len(ids) == len(set(ids)), "an item was exported twice"
    assert set(ids) == set(gold), "exported items differ from ingested items"
    assert set(labels["label"]) <= set(BBC_LABELS) and labels["label"].notna().all()
    for row in labels.itertuples():
        if row.source == "human":
            assert row.label == gold[row.id], "a person's label was changed on the way out"

    # -- the rest of the surface, on the same stack ----------------------------------------------
    with Client() as client:
        assert client.status(PROJECT).finalized == 30
        assert client.get_project(PROJECT).labels == BBC_LABELS
        assert client.create_project(PROJECT, BBC_LABELS, target_accuracy=0.9).project_id == PROJECT
        with pytest.raises(AlreadyExists, match="exists already"):
            client.create_project(PROJECT, ["a", "b"])
        with pytest.raises(NotFound):
            client.get_project("no-such-project")
        with pytest.raises(TypeError, match="unknown project settings"):
            client.create_project("other", ["a", "b"], target_acuracy=0.9)
        rows = [{"id": "blank", "text": "   ", "lang": "en"}, {"id": "again", "text": gold_text(labels)}]
        more = client.ingest(PROJECT, rows)
        assert (more.accepted, more.duplicates, more.rejected) == (0, 1, 1)
        assert [(r.id, r.reason) for r in more.rejections] == [("blank", "text is empty")]
        if importlib.util.find_spec("datasets") is None:
            with pytest.raises(ImportError, match="pip install datasets"):
                client.export_dataset(PROJECT)
    with Client(token="tdm_not-a-token") as stranger, pytest.raises(Unauthenticated):
        stranger.status(PROJECT)


def gold_text(labels: Any) -> str:
    """The text of an item already in the project: sent again, it is a duplicate."""
    return str(labels["text"].iloc[0])
