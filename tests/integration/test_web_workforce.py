"""The workforce pages on the real services: a manager creates a pool, puts a person in it with
skills, edits a project's workforce settings, uploads gold questions, sees the person's gold
accuracy on the quality page, pauses and resumes them; an annotator is refused every one of it.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.cli.client import Clients
from services.cli.stack import Stack
from services.gen.tandem.identity.v1 import identity_pb2
from services.gen.tandem.ingest.v1 import ingest_pb2
from services.gen.tandem.projects.v1 import projects_pb2
from services.gen.tandem.workforce.v1 import workforce_pb2

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

SERVICES = ("identity", "ingest", "scorer", "review", "export", "web")
PASSWORD = "correct horse battery"
_CSRF = re.compile(r'<meta name="csrf-token" content="([0-9a-f]+)">')
_LOGIN_CSRF = re.compile(r'name="csrf" value="([0-9a-f]+)"')
GOLD = {"g1": "yes", "g2": "no"}


@pytest.fixture
async def stack(tmp_path: Path, nats_url: str, database_url: str) -> AsyncIterator[Stack]:
    s = Stack(tmp_path / "state", nats_url=nats_url, database_url=database_url, services=SERVICES)
    await asyncio.to_thread(s.start)
    try:
        async with Clients(s.targets, token=s.admin_token) as admin:
            for project_id in ("mine", "theirs"):
                await admin.ingest.CreateProject(
                    ingest_pb2.CreateProjectRequest(
                        project=projects_pb2.Project(
                            project_id=project_id,
                            name=f"Project {project_id}",
                            labels=[projects_pb2.LabelDef(name="yes"), projects_pb2.LabelDef(name="no")],
                        )
                    )
                )
            for user_id, role in (("ann", identity_pb2.ROLE_ANNOTATOR), ("boss", identity_pb2.ROLE_MANAGER)):
                await admin.identity.CreateUser(
                    identity_pb2.CreateUserRequest(
                        user_id=user_id, role=role, password=PASSWORD, project_ids=["mine"]
                    )
                )
        yield s
    finally:
        await asyncio.to_thread(s.stop)


async def _login(client: httpx.AsyncClient, user_id: str) -> None:
    form = await client.get("/login")
    match = _LOGIN_CSRF.search(form.text)
    assert match is not None, form.text
    answer = await client.post(
        "/login", data={"csrf": match.group(1), "user_id": user_id, "password": PASSWORD, "next": "/projects"}
    )
    assert answer.status_code == 303, answer.text


def _csrf(page: httpx.Response) -> str:
    match = _CSRF.search(page.text)
    assert match is not None, page.text
    return match.group(1)


def _card(page: httpx.Response, element_id: str) -> str:
    match = re.search(rf'id="{element_id}">([^<]*)<', page.text)
    assert match is not None, f"{element_id} not on the page"
    return match.group(1)


def _row(page: httpx.Response, first_cell: str) -> str:
    """The table row whose first cell is `first_cell`, as HTML."""
    for row in re.findall(r"<tr>(.*?)</tr>", page.text, flags=re.S):
        if re.match(rf"\s*<td>{re.escape(first_cell)}</td>", row):
            return str(row)
    raise AssertionError(f"no row for {first_cell!r}")


async def _answer_a_gold_question(ann: httpx.AsyncClient, token: str) -> str:
    """Claim until a gold question comes (nothing else waits: no item was pre-labeled), answer it
    rightly; the external id answered."""
    headers = {"X-CSRF-Token": token}
    for _ in range(40):
        claimed = await ann.post("/api/projects/mine/next", json={}, headers=headers)
        assert claimed.status_code == 200, claimed.text
        task: dict[str, Any] | None = claimed.json()["task"]
        if task is None:
            continue
        assert task["external_id"] in GOLD and task["suggestion"] is None, task
        done = await ann.post(
            f"/api/tasks/{task['task_id']}/submit",
            json={"lease_id": task["lease_id"], "label": GOLD[task["external_id"]], "seconds_spent": 2.0},
            headers=headers,
        )
        assert done.status_code == 200 and done.json()["accepted"] is True, done.text
        return str(task["external_id"])
    raise AssertionError("no gold question in 40 claims")


async def test_a_manager_runs_the_workforce(stack: Stack) -> None:
    async with (
        httpx.AsyncClient(base_url=stack.web_url, timeout=30) as boss,
        Clients(stack.targets, token=stack.admin_token) as admin,
    ):
        await _login(boss, "boss")
        # The menus offer the pages to a manager.
        status_page = await boss.get("/projects/mine")
        assert 'href="/projects/mine/workforce"' in status_page.text and 'href="/pools"' in status_page.text

        # A pool, then a person in it with skills.
        pools = await boss.get("/pools")
        assert pools.status_code == 200 and "No pools yet." in pools.text
        token = _csrf(pools)
        made = await boss.post(
            "/pools", data={"csrf": token, "pool_id": "crowd", "name": "The crowd", "max_leased": "5"}
        )
        assert made.status_code == 303 and made.headers["location"] == "/pools"
        refused = await boss.post("/pools", data={"csrf": token, "pool_id": "Not An Id", "name": "x"})
        assert refused.status_code == 400 and "pool_id must be" in refused.text
        assert 'value="Not An Id"' in refused.text  # the form keeps what was typed
        person = await boss.post(
            "/pools/annotators",
            data={
                "csrf": token,
                "annotator_id": "ann",
                "pool_id": "crowd",
                "skills": "language=en, domain=support desk",
                "max_leased": "3",
            },
        )
        assert person.status_code == 303
        nowhere = await boss.post(
            "/pools/annotators", data={"csrf": token, "annotator_id": "ann", "pool_id": "ghost"}
        )
        assert nowhere.status_code == 400 and "no pool &#39;ghost&#39;" in nowhere.text
        listed = await admin.workforce.ListAnnotators(workforce_pb2.ListAnnotatorsRequest(pool_id="crowd"))
        assert [(a.annotator_id, list(a.skills), a.max_leased) for a in listed.annotators] == [
            ("ann", ["language=en", "domain=support desk"], 3)
        ]
        pools = await boss.get("/pools")
        assert "The crowd" in pools.text and 'value="language=en, domain=support desk"' in pools.text

        # The project's workforce settings: only what changed is sent. The post is not followed:
        # the review service caches a project for 10 s once it reads it, and the gold check below
        # must see these settings.
        saved = await boss.post(
            "/projects/mine/workforce/settings",
            data={
                "csrf": token,
                "pools": "crowd=2",
                "skill_fields": "",
                "overlap": "2",
                "max_overlap": "3",
                "overlap_below_confidence": "",
                "sla_seconds": "",
                "gold_first": "",
                "gold_first_share": "1",
                "gold_share": "",
                "quality_bar": "",
            },
        )
        assert saved.status_code == 303, saved.text
        assert saved.headers["location"] == (
            "/projects/mine/workforce?saved=pools,overlap,max_overlap,gold_first_share#settings"
        )
        project = await admin.ingest.GetProject(ingest_pb2.GetProjectRequest(project_id="mine"))
        assert [(p.pool_id, p.share) for p in project.pools] == [("crowd", 2.0)]
        assert (project.overlap, project.max_overlap, project.gold_first_share) == (2, 3, 1.0)

        # Gold questions: good rows go in, each bad one is listed with its line.
        rows = [
            json.dumps({"id": "g1", "text": "Gold one", "label": "yes"}),
            json.dumps({"external_id": "g2", "text": "Gold two", "answer": "no"}),
            json.dumps({"id": "g3", "text": "Gold three", "label": "maybe"}),
            "not json",
            json.dumps({"id": "g1", "text": "again", "label": "no"}),
            json.dumps({"text": "no id", "label": "yes"}),
        ]
        files = {"file": ("gold.jsonl", "\n".join(rows).encode(), "application/x-ndjson")}
        assert (await boss.post("/projects/mine/workforce/gold", files=files)).status_code == 403
        gold = await boss.post("/projects/mine/workforce/gold", data={"csrf": token}, files=files)
        assert gold.status_code == 200, gold.text
        assert (_card(gold, "gold-added"), _card(gold, "gold-rejected"), _card(gold, "gold-total")) == (
            "2",
            "4",
            "2",
        )
        assert "&#39;maybe&#39; is not one of the project&#39;s labels" in _row(gold, "line 3")
        assert "not valid JSON" in _row(gold, "line 4")
        assert "the same id as line 1" in _row(gold, "line 5")
        assert "no id" in _row(gold, "line 6")

        # The annotator answers a gold question; the quality page shows it.
        async with httpx.AsyncClient(base_url=stack.web_url, timeout=30) as ann:
            await _login(ann, "ann")
            ann_token = _csrf(await ann.get("/projects"))
            await _answer_a_gold_question(ann, ann_token)

            page = await boss.get("/projects/mine/workforce")
            assert page.status_code == 200
            assert _card(page, "gold-items") == "2" and _card(page, "consensus-items") == "0"
            assert _card(page, "alpha") == "—"  # no item has two labels yet
            row = _row(page, "ann")
            assert "<td>crowd</td>" in row and "1.00 [0.21, 1.00] n=1" in row
            assert '<span class="badge ok">active</span>' in row
            assert "<td>crowd</td>" in _row(page, "crowd")  # the pool's queue row
            assert 'name="pools" rows="3">crowd=2</textarea>' in page.text

            # Pause: the person gets no task here, with the reason; resume: they do again.
            token = _csrf(page)
            paused = await boss.post(
                "/projects/mine/workforce/pause",
                data={"csrf": token, "annotator_id": "ann", "action": "pause", "reason": "answers too fast"},
            )
            assert paused.status_code == 303
            assert paused.headers["location"] == "/projects/mine/workforce?paused=ann"
            page = await boss.get(paused.headers["location"])
            assert "ann is paused on this project" in page.text
            row = _row(page, "ann")
            assert "paused</span>" in row and "answers too fast" in row and 'value="resume"' in row
            refused = await ann.post("/api/projects/mine/next", json={}, headers={"X-CSRF-Token": ann_token})
            assert refused.status_code == 409 and "answers too fast" in refused.json()["message"]
            people = await admin.workforce.ListAnnotators(workforce_pb2.ListAnnotatorsRequest())
            assert [list(a.paused_projects) for a in people.annotators if a.annotator_id == "ann"] == [
                ["mine"]
            ]

            resumed = await boss.post(
                "/projects/mine/workforce/pause",
                data={"csrf": token, "annotator_id": "ann", "action": "resume"},
            )
            assert resumed.status_code == 303
            page = await boss.get(resumed.headers["location"])
            assert "ann may work on this project again" in page.text
            assert '<span class="badge ok">active</span>' in _row(page, "ann")
            again = await ann.post("/api/projects/mine/next", json={}, headers={"X-CSRF-Token": ann_token})
            assert again.status_code == 200, again.text

        # Refusals on the settings form keep the person's values and say what to fix.
        base = {"csrf": token, "pools": "crowd=2", "overlap": "2", "max_overlap": "3"}
        same = await boss.post("/projects/mine/workforce/settings", data=base)
        assert same.status_code == 200 and "Nothing changed" in same.text
        bad = await boss.post("/projects/mine/workforce/settings", data={**base, "max_overlap": "1"})
        assert bad.status_code == 400 and "max_overlap must be 0" in bad.text
        assert 'name="max_overlap" value="1"' in bad.text
        typo = await boss.post("/projects/mine/workforce/settings", data={**base, "gold_share": "lots"})
        assert typo.status_code == 400 and "gold share must be a number" in typo.text
        cleared = await boss.post("/projects/mine/workforce/settings", data={**base, "pools": ""})
        assert cleared.status_code == 303 and "saved=pools" in cleared.headers["location"]
        project = await admin.ingest.GetProject(ingest_pb2.GetProjectRequest(project_id="mine"))
        assert list(project.pools) == [] and project.max_overlap == 3

        # A manager of another project sees none of this one's workforce.
        assert (await boss.get("/projects/theirs/workforce")).status_code == 403


async def test_an_annotator_may_not(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.web_url, timeout=30) as ann:
        await _login(ann, "ann")
        page = await ann.get("/projects/mine")
        assert page.status_code == 200
        assert "/workforce" not in page.text and 'href="/pools"' not in page.text
        token = _csrf(page)
        for url in ("/pools", "/projects/mine/workforce"):
            refused = await ann.get(url)
            assert refused.status_code == 403 and "Not allowed" in refused.text, url
        for url, data in (
            ("/pools", {"pool_id": "mine"}),
            ("/pools/annotators", {"annotator_id": "ann", "pool_id": ""}),
            ("/projects/mine/workforce/pause", {"annotator_id": "ann", "action": "resume"}),
            ("/projects/mine/workforce/settings", {"overlap": "3"}),
        ):
            refused = await ann.post(url, data={"csrf": token, **data})
            assert refused.status_code == 403, url
        files = {"file": ("gold.jsonl", b'{"id": "g", "text": "t", "label": "yes"}', "application/x-ndjson")}
        gold = await ann.post("/projects/mine/workforce/gold", data={"csrf": token}, files=files)
        assert gold.status_code == 403
    async with Clients(stack.targets, token=stack.admin_token) as admin:
        # Nothing of it reached the services.
        assert not (await admin.workforce.ListPools(workforce_pb2.ListPoolsRequest())).pools
        quality = await admin.workforce.GetQuality(workforce_pb2.GetQualityRequest(project_id="mine"))
        assert quality.gold_items == 0 and not quality.annotators
        project = await admin.ingest.GetProject(ingest_pb2.GetProjectRequest(project_id="mine"))
        assert project.overlap == 1
