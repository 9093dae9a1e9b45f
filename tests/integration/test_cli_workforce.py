"""`tandem pool|annotator|gold|quality`, the workforce options of `tandem project create|edit` and
the workforce block of `tandem status`, run as the command itself against the real services."""

from __future__ import annotations

import asyncio
import csv
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.cli.client import Clients
from services.cli.stack import Stack
from services.cli.targets import write_targets
from services.gen.tandem.identity.v1 import identity_pb2
from services.gen.tandem.ingest.v1 import ingest_pb2
from services.gen.tandem.review.v1 import review_pb2
from services.gen.tandem.workforce.v1 import workforce_pb2

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SERVICES = ("identity", "ingest", "scorer", "review", "export")
ROOT = Path(__file__).resolve().parents[2]
BOX = re.compile("[\u2500-\u257f]")  # rich's table borders
PROJECT_YAML = """\
project_id: wf
labels: ["yes", "no"]
pools: {crowd: 2}
skill_fields: [language]
overlap: 2
gold_first_share: 1
quality_bar: 0.8
"""


@dataclass
class Ran:
    code: int
    out: str


@dataclass
class Cli:
    state_dir: Path
    token: str

    async def __call__(self, *argv: str) -> Ran:
        env = {**os.environ, "TANDEM_TOKEN": self.token}
        for name in ("INGEST", "INFERENCE", "SCORER", "REVIEW", "EXPORT", "IDENTITY"):
            env.pop(f"TANDEM_{name}_TARGET", None)  # the state dir's targets.json says where
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "services.cli", "--state-dir", str(self.state_dir), *argv],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return Ran(done.returncode, done.stdout + done.stderr)


@pytest.fixture
async def stack(tmp_path: Path, nats_url: str, database_url: str) -> AsyncIterator[Stack]:
    s = Stack(tmp_path / "state", nats_url=nats_url, database_url=database_url, services=SERVICES)
    await asyncio.to_thread(s.start)
    try:
        yield s
    finally:
        await asyncio.to_thread(s.stop)


def _ok(ran: Ran, *expected: str) -> str:
    assert ran.code == 0, ran.out
    # Rich folds long lines and draws tables: the checks are about words, not lines and borders.
    flat = " ".join(BOX.sub(" ", ran.out).split())
    for text in expected:
        assert text in flat, f"{text!r} not in:\n{ran.out}"
    return flat


def _refused(ran: Ran, expected: str) -> None:
    assert ran.code == 1, ran.out
    assert "error:" in ran.out and expected in " ".join(BOX.sub(" ", ran.out).split()), ran.out


async def test_the_workforce_from_the_command_line(stack: Stack, tmp_path: Path) -> None:
    cli_dir = tmp_path / "cli"
    cli_dir.mkdir()
    write_targets(cli_dir, stack.targets)
    tandem = Cli(cli_dir, stack.admin_token)

    # A project whose file names its workforce, and a person to work on it.
    spec = tmp_path / "wf.yaml"
    spec.write_text(PROJECT_YAML)
    _ok(await tandem("project", "create", str(spec)), "project wf")
    _ok(
        await tandem(
            "user", "add", "ann", "--role", "annotator", "--password", "pw-annotator-1", "--project", "wf"
        ),
        "ann (annotator)",
    )
    async with Clients(stack.targets, token=stack.admin_token) as admin:
        project = await admin.ingest.GetProject(ingest_pb2.GetProjectRequest(project_id="wf"))
    assert [(p.pool_id, p.share) for p in project.pools] == [("crowd", 2.0)]
    assert (list(project.skill_fields), project.overlap, project.gold_first_share, project.quality_bar) == (
        ["language"],
        2,
        1.0,
        0.8,
    )

    # Pools: created, then changed option by option (what is not given stays).
    _ok(
        await tandem("pool", "add", "crowd", "--name", "The crowd", "--max-leased", "5"), "pool crowd created"
    )
    _ok(
        await tandem("pool", "add", "crowd", "--vendor", "vend"),
        "pool crowd changed: The crowd, at most 5 leased, vendor account vend",
    )
    listed = _ok(await tandem("pool", "list"))
    assert "crowd" in listed and "The crowd" in listed and "vend" in listed
    _refused(await tandem("pool", "add", "Not-An-Id"), "INVALID_ARGUMENT: pool_id must be")

    # A person's pool and skills; a later call changes only what it names.
    _ok(
        await tandem("annotator", "set", "ann", "--pool", "crowd", "--skill", "language=en"),
        "annotator ann: pool crowd, skills language=en",
    )
    _ok(
        await tandem("annotator", "set", "ann", "--max-leased", "3"),
        "annotator ann: pool crowd, skills language=en, max leased 3",
    )
    _refused(await tandem("annotator", "set", "ann", "--skill", "english"), "skills are field=value")
    _refused(await tandem("annotator", "set", "ann", "--pool", "ghost"), "NOT_FOUND: no pool 'ghost'")
    in_crowd = _ok(await tandem("annotator", "list", "--pool", "crowd"))
    assert "ann" in in_crowd and "language=en" in in_crowd
    assert "no annotators in pool nobody" in _ok(await tandem("annotator", "list", "--pool", "nobody"))

    # Gold: a CSV with a few bad rows, then a file larger than one call takes.
    small = tmp_path / "gold.csv"
    with small.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "text", "label"])
        writer.writerows(
            [
                ["g1", "Gold one, with a comma", "yes"],
                ["g2", "Gold two\nover two lines", "no"],
                ["g3", "Gold three", "maybe"],
                ["g4", "", "yes"],
                ["g1", "again", "no"],
            ]
        )
    out = _ok(
        await tandem("gold", "add", "--project", "wf", str(small)),
        "added 2 gold questions to wf (2 in all); 3 rows left out",
        "gold.csv:5: g3: 'maybe' is not one of the project's labels (yes, no)",
        "gold.csv:6: g4: no text",
        "gold.csv:7: g1: the same id as line 2",
    )
    assert "gold.csv:3" not in out and "gold.csv:4" not in out  # the quoted newline is one row
    big = tmp_path / "gold.jsonl"
    big.write_text("".join(f'{{"id": "b{i}", "text": "bulk {i}", "answer": "no"}}\n' for i in range(2500)))
    _ok(
        await tandem("gold", "add", "--project", "wf", str(big)),
        "added 2,500 gold questions to wf (2,502 in all)",
    )
    junk = tmp_path / "junk.jsonl"
    junk.write_text("not json\n[1, 2]\n")
    _refused(await tandem("gold", "add", "--project", "wf", str(junk)), "no usable gold rows")

    # The annotator answers a gold question (the project asks gold first), then is paused.
    async with Clients(stack.targets, token=stack.admin_token) as admin:
        made = await admin.identity.CreateToken(identity_pb2.CreateTokenRequest(user_id="ann", name="test"))
    async with Clients(stack.targets, token=made.token) as ann:
        task = await ann.review.NextTask(review_pb2.NextTaskRequest(project_id="wf"), timeout=10)
        answer = "yes" if task.external_id == "g1" else "no"
        await ann.review.SubmitLabel(
            review_pb2.SubmitLabelRequest(
                task_id=task.task_id, lease_id=task.lease_id, label=answer, seconds_spent=1.0
            ),
            timeout=10,
        )
    _ok(
        await tandem("annotator", "pause", "ann", "--project", "wf", "--reason", "answers too fast"),
        "ann is paused on wf: answers too fast",
    )
    quality = _ok(
        await tandem("quality", "--project", "wf"),
        "annotators on wf",
        "1.00 [0.21, 1.00] n=1",
        "paused: answers too fast",
        "2,502 gold questions",
        "consensus:",
    )
    assert "crowd" in quality
    paused = _ok(await tandem("annotator", "list"))
    assert "ann crowd language=en 3 wf" in paused
    _ok(await tandem("annotator", "resume", "ann", "--project", "wf"), "ann may work on wf again")
    async with Clients(stack.targets, token=stack.admin_token) as admin:
        people = await admin.workforce.ListAnnotators(workforce_pb2.ListAnnotatorsRequest())
    assert [(a.annotator_id, list(a.paused_projects)) for a in people.annotators] == [("ann", [])]

    # The project's workforce settings from `project edit`.
    _ok(
        await tandem(
            "project",
            "edit",
            "wf",
            "--overlap",
            "3",
            "--max-overlap",
            "4",
            "--pool",
            "crowd=1",
            "--pool",
            "other=2.5",
            "--gold-share",
            "0.2",
            "--sla-seconds",
            "600",
        ),
        "project wf: changed pools, overlap, max_overlap, sla_seconds, gold_share",
    )
    async with Clients(stack.targets, token=stack.admin_token) as admin:
        project = await admin.ingest.GetProject(ingest_pb2.GetProjectRequest(project_id="wf"))
    assert [(p.pool_id, p.share) for p in project.pools] == [("crowd", 1.0), ("other", 2.5)]
    assert (project.overlap, project.max_overlap, project.gold_share, project.sla_seconds) == (
        3,
        4,
        0.2,
        600.0,
    )
    _refused(
        await tandem("project", "edit", "wf", "--max-overlap", "2"), "INVALID_ARGUMENT: max_overlap must be 0"
    )
    _refused(await tandem("project", "edit", "wf", "--pool", "crowd=lots"), "--pool takes POOL=SHARE")
    _refused(await tandem("project", "edit", "wf", "--pool", "crowd", "--no-pools"), "not both")
    _ok(
        await tandem("project", "edit", "wf", "--no-pools", "--skill-field", "lang"),
        "changed pools, skill_fields",
    )
    async with Clients(stack.targets, token=stack.admin_token) as admin:
        project = await admin.ingest.GetProject(ingest_pb2.GetProjectRequest(project_id="wf"))
    assert list(project.pools) == [] and list(project.skill_fields) == ["lang"]

    # `tandem status` adds the workforce block for a project with overlap or gold.
    _ok(
        await tandem("status", "--project", "wf"),
        "workforce",
        "3 per item, up to 4 while they disagree",
        "2,502 gold questions",
        "pools crowd: 0 open, 0 leased",
    )


async def test_a_vendor_account_from_the_command_line(
    tmp_path: Path, nats_url: str, database_url: str
) -> None:
    s = Stack(tmp_path / "state", nats_url=nats_url, database_url=database_url, services=("identity",))
    await asyncio.to_thread(s.start)
    try:
        cli_dir = tmp_path / "cli"
        cli_dir.mkdir()
        write_targets(cli_dir, s.targets)
        tandem = Cli(cli_dir, s.admin_token)
        _ok(
            await tandem("user", "add", "vend", "--role", "vendor", "--password", "pw-vendor-1"),
            "vend (vendor)",
        )
        listed = " ".join(_ok(await tandem("user", "list")).split())
        assert "vend vendor" in listed, listed
    finally:
        await asyncio.to_thread(s.stop)
