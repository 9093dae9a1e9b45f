"""The web app on the real services: login, CSRF, per-person project lists, 403s, upload, logout,
second-opinion mode, the suggestion setting, the status page's charts.

The app is a client of the services like any other, so these tests check what a browser sees:
pages and redirects, cookies, and the JSON API of the labeling screen.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from services.cli.client import Clients
from services.cli.stack import Stack
from services.gen.tandem.identity.v1 import identity_pb2
from services.gen.tandem.ingest.v1 import ingest_pb2
from services.gen.tandem.projects.v1 import projects_pb2

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# No inference: nothing here needs a prediction, and the model load would dominate the test.
SERVICES = ("identity", "ingest", "scorer", "review", "export", "web")
PASSWORD = "correct horse battery"
_CSRF = re.compile(r'<meta name="csrf-token" content="([0-9a-f]+)">')
_LOGIN_CSRF = re.compile(r'name="csrf" value="([0-9a-f]+)"')


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
            for user_id, role, projects in (
                ("ann", identity_pb2.ROLE_ANNOTATOR, ["mine"]),
                ("boss", identity_pb2.ROLE_MANAGER, ["mine"]),
            ):
                await admin.identity.CreateUser(
                    identity_pb2.CreateUserRequest(
                        user_id=user_id, role=role, password=PASSWORD, project_ids=projects
                    )
                )
        yield s
    finally:
        await asyncio.to_thread(s.stop)


async def _login(client: httpx.AsyncClient, user_id: str, password: str = PASSWORD) -> httpx.Response:
    form = await client.get("/login")
    match = _LOGIN_CSRF.search(form.text)
    assert match is not None, form.text
    return await client.post(
        "/login", data={"csrf": match.group(1), "user_id": user_id, "password": password, "next": "/projects"}
    )


def _csrf(page: httpx.Response) -> str:
    match = _CSRF.search(page.text)
    assert match is not None, page.text
    return match.group(1)


async def test_login_pages_csrf_and_logout(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.web_url, timeout=15) as anon:
        # Nothing but the login page without a session; the API answers 401, not a redirect.
        first = await anon.get("/projects")
        assert first.status_code == 303 and first.headers["location"].startswith("/login")
        assert (await anon.post("/api/projects/mine/next", json={})).status_code == 401
        wrong = await _login(anon, "ann", "not the password")
        assert wrong.status_code == 401 and "Wrong user id or password" in wrong.text
        assert "tandem_session" not in anon.cookies

    async with httpx.AsyncClient(base_url=stack.web_url, timeout=15) as ann:
        answer = await _login(ann, "ann")
        assert answer.status_code == 303 and answer.headers["location"] == "/projects"
        cookie = answer.headers["set-cookie"]
        assert "tandem_session=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie

        projects = await ann.get("/projects")
        assert projects.status_code == 200
        assert "Project mine" in projects.text and "theirs" not in projects.text
        for header, value in (("x-frame-options", "DENY"), ("cache-control", "no-store")):
            assert projects.headers[header] == value
        assert "script-src 'self'" in projects.headers["content-security-policy"]
        token = _csrf(projects)

        # Another project's pages and API: a clear 403, nothing of it shown.
        for url in ("/projects/theirs", "/projects/theirs/label", "/projects/theirs/members"):
            refused = await ann.get(url)
            assert refused.status_code == 403, url
            assert "Not allowed" in refused.text and "Project theirs" not in refused.text
        api = await ann.post("/api/projects/theirs/next", json={}, headers={"X-CSRF-Token": token})
        assert api.status_code == 403 and api.json()["error"] == "forbidden"
        assert (await ann.get("/projects/nope/label")).status_code in (403, 404)
        # A role that may not: annotators do not upload or manage users.
        assert (await ann.get("/projects/mine/upload")).status_code == 403
        assert (await ann.get("/admin/users")).status_code == 403

        # CSRF: a state-changing request without the token (or with another) is refused.
        assert (await ann.post("/api/projects/mine/next", json={})).status_code == 403
        bad = await ann.post("/api/projects/mine/next", json={}, headers={"X-CSRF-Token": "0" * 64})
        assert bad.status_code == 403 and bad.json()["error"] == "csrf"
        assert (await ann.post("/logout", data={})).status_code == 403
        # With it: the labeling screen's API works (no task yet: nothing was pre-labeled).
        empty = await ann.post("/api/projects/mine/next", json={}, headers={"X-CSRF-Token": token})
        assert empty.status_code == 200 and empty.json()["task"] is None
        assert empty.json()["skipped_before"] is False
        label_page = await ann.get("/projects/mine/label")
        assert label_page.status_code == 200 and 'data-key="1"' in label_page.text
        assert "Second opinions only" not in label_page.text
        # Second-opinion mode: the screen says so and its claims carry the flag, which the
        # review service takes (nothing waits here); so does "show the tasks I skipped".
        second_page = await ann.get("/projects/mine/label?mode=second")
        assert second_page.status_code == 200 and "Second opinions only" in second_page.text
        assert "&#34;second_opinions_only&#34;: true" in second_page.text
        for flags in (
            {"second_opinions_only": True},
            {"include_skipped": True},
            {"second_opinions_only": True, "include_skipped": True},
        ):
            answer = await ann.post("/api/projects/mine/next", json=flags, headers={"X-CSRF-Token": token})
            assert answer.status_code == 200 and answer.json()["task"] is None, flags
        refused = await ann.post(
            "/api/projects/mine/next", json={"second_opinions_only": "yes"}, headers={"X-CSRF-Token": token}
        )
        assert refused.status_code == 400 and "second_opinions_only" in refused.json()["message"]

        # Logout ends the session at the services: the old cookie no longer opens anything.
        old = ann.cookies["tandem_session"]
        out = await ann.post("/logout", data={"csrf": token})
        assert out.status_code == 303 and out.headers["location"] == "/login"
    async with httpx.AsyncClient(
        base_url=stack.web_url, timeout=15, cookies={"tandem_session": old}
    ) as replay:
        again = await replay.get("/projects")
        assert again.status_code == 303 and again.headers["location"].startswith("/login")


async def test_manager_uploads_and_sees_the_result(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.web_url, timeout=30) as boss:
        assert (await _login(boss, "boss")).status_code == 303
        # The suggestion setting: ticked by default, and an unticked box (absent from the post)
        # creates a project that hides the model's suggestion.
        form_page = await boss.get("/projects/new")
        assert re.search(r'name="show_suggestions" value="on"\s+checked', form_page.text), form_page.text
        for project_id, shown in (("quiet", False), ("shown", True)):
            fields = {
                "csrf": _csrf(form_page),
                "project_id": project_id,
                "labels": "yes\nno",
                "target_accuracy": "0.95",
                "guarantee": "dataset",
            }
            if shown:
                fields["show_suggestions"] = "on"
            created = await boss.post("/projects/new", data=fields)
            assert created.status_code == 303 and created.headers["location"] == f"/projects/{project_id}"
        async with Clients(stack.targets, token=stack.admin_token) as admin:
            for project_id, hidden in (("quiet", True), ("shown", False)):
                project = await admin.ingest.GetProject(ingest_pb2.GetProjectRequest(project_id=project_id))
                assert project.hide_suggestions is hidden, project_id
        quiet = await boss.get("/projects/quiet")
        assert "suggestion is hidden from annotators" in quiet.text
        assert "Annotators see the model's suggestion" in (await boss.get("/projects/shown")).text
        # The throughput chart fills in while the page is open; the accuracy rows are there at once.
        assert 'id="throughput-empty"' in quiet.text and "Audited accuracy" in quiet.text

        # A manager sees second-opinion mode offered on the reviewer's page; an annotator does not.
        review = await boss.get("/review")
        assert review.status_code == 200 and 'href="/projects/mine/label?mode=second"' in review.text
        page = await boss.get("/projects/mine/upload")
        assert page.status_code == 200
        token = _csrf(page)
        lines = [
            '{"id": "a", "text": "The invoice is wrong", "source": "mail"}',
            '{"id": "b", "text": "The invoice is wrong"}',
            '{"id": "c", "text": ""}',
            "not json",
            '{"id": "d", "text": "Cannot log in", "label": "no"}',
        ]
        files = {"file": ("items.jsonl", "\n".join(lines).encode(), "application/x-ndjson")}
        # Without the token as the first part the upload is refused before the file is read.
        refused = await boss.post("/projects/mine/upload", files=files)
        assert refused.status_code == 403
        done = await boss.post("/projects/mine/upload", data={"csrf": token}, files=files)
        assert done.status_code == 200, done.text
        numbers = {
            k: re.search(rf'id="{k}">(\d+)<', done.text) for k in ("accepted", "duplicates", "rejected")
        }
        assert {k: int(m.group(1)) for k, m in numbers.items() if m} == {
            "accepted": 2,
            "duplicates": 1,
            "rejected": 2,
        }
        assert "line 4" in done.text and "not valid JSON" in done.text

        # The same page carries the progress bar's script and its (hidden) bar; the form itself
        # still posts without it, as above.
        assert '<script src="/static/upload.js?v=' in done.text and 'id="upload-progress"' in done.text
        assert re.search(r'id="upload-progress" hidden', done.text)
        assert re.search(r'id="upload-form" data-max-bytes="\d+"', done.text)
        script = await boss.get("/static/upload.js")
        assert script.status_code == 200 and "XMLHttpRequest" in script.text

        status = await boss.get("/projects/mine")
        assert status.status_code == 200 and "Ingested" in status.text
        assert "Annotators see the model" in status.text
        members = await boss.get("/projects/mine/members")
        assert members.status_code == 200 and "ann" in members.text


def _edit_form(page: httpx.Response, **changes: str | list[str]) -> dict[str, str | list[str]]:
    """The edit form's fields as the page prefills them (what a browser would post), then `changes`."""
    fields: dict[str, str | list[str]] = {
        "csrf": _csrf(page),
        "name": _value(page, "input", "name"),
        "instructions": _value(page, "textarea", "instructions"),
        "label_description": re.findall(r'name="label_description" value="([^"]*)"', page.text),
        "human_budget_items": _value(page, "input", "human_budget_items"),
        "human_budget_share": _value(page, "input", "human_budget_share"),
        # The hidden "off", then the checkbox's "on" when it is ticked.
        "show_suggestions": ["off", "on"]
        if re.search(r'name="show_suggestions" value="on"\s*checked', page.text)
        else ["off"],
    }
    fields.update(changes)
    return fields


def _value(page: httpx.Response, tag: str, name: str) -> str:
    if tag == "textarea":
        match = re.search(rf'<textarea name="{name}"[^>]*>(.*?)</textarea>', page.text, re.S)
    else:
        match = re.search(rf'<input name="{name}" value="([^"]*)"', page.text)
    assert match is not None, (name, page.text)
    return match.group(1)


async def test_managers_edit_a_project_others_may_not(stack: Stack) -> None:
    async def project() -> projects_pb2.Project:
        async with Clients(stack.targets, token=stack.admin_token) as admin:
            found: projects_pb2.Project = await admin.ingest.GetProject(
                ingest_pb2.GetProjectRequest(project_id="mine")
            )
            return found

    async with httpx.AsyncClient(base_url=stack.web_url, timeout=30) as boss:
        assert (await _login(boss, "boss")).status_code == 303
        status = await boss.get("/projects/mine")
        assert 'href="/projects/mine/edit"' in status.text and ">Settings</a>" in status.text
        page = await boss.get("/projects/mine/edit")
        assert page.status_code == 200, page.text
        # The fixed settings are shown, not offered, with the reason.
        assert 'name="target_accuracy"' not in page.text and "95.0%" in page.text
        assert "certificate in progress" in page.text
        assert _value(page, "input", "name") == "Project mine"

        # Instructions, a label description and the suggestion setting: only those are sent.
        edited = await boss.post(
            "/projects/mine/edit",
            data=_edit_form(
                page,
                instructions="Answer yes\r\nwhen in doubt.",
                label_description=["It is so.", ""],
                show_suggestions=["off"],
            ),
        )
        assert edited.status_code == 303, edited.text
        location = edited.headers["location"]
        assert location == "/projects/mine/edit?saved=instructions,label_descriptions,hide_suggestions"
        saved = await boss.get(location)
        assert "Saved: instructions, label descriptions, suggestion setting" in saved.text
        assert "10 seconds" in saved.text
        assert _value(saved, "textarea", "instructions") == "Answer yes\nwhen in doubt."
        assert not re.search(r'name="show_suggestions" value="on"\s*checked', saved.text)
        stored = await project()
        assert stored.instructions == "Answer yes\nwhen in doubt." and stored.hide_suggestions
        assert [(lb.name, lb.description) for lb in stored.labels] == [("yes", "It is so."), ("no", "")]
        assert stored.name == "Project mine" and stored.target_accuracy == pytest.approx(0.95)
        assert "suggestion is hidden from annotators" in (await boss.get("/projects/mine")).text

        # The same form again, untouched (CRLF line breaks as browsers post them): nothing to send.
        again = await boss.post(
            "/projects/mine/edit",
            data=_edit_form(saved, instructions="Answer yes\r\nwhen in doubt.\r\n"),
        )
        assert again.status_code == 200 and "Nothing changed" in again.text
        # Ticked again, with a budget.
        back = await boss.post(
            "/projects/mine/edit",
            data=_edit_form(saved, show_suggestions=["off", "on"], human_budget_items="40"),
        )
        assert back.headers["location"].endswith("?saved=hide_suggestions,human_budget_items")
        stored = await project()
        assert not stored.hide_suggestions and stored.human_budget_items == 40

        # A fixed setting: the service refuses, and says why on the form, which keeps the edits.
        fixed = await boss.post(
            "/projects/mine/edit",
            data=_edit_form(saved, target_accuracy="0.8", name="Renamed meanwhile"),
        )
        assert fixed.status_code == 400
        assert "target_accuracy cannot change after creation" in fixed.text and 'role="alert"' in fixed.text
        assert _value(fixed, "input", "name") == "Renamed meanwhile"
        # A malformed value is caught before any call.
        bad = await boss.post("/projects/mine/edit", data=_edit_form(saved, human_budget_share="half"))
        assert bad.status_code == 400 and "human budget share must be a number" in bad.text
        stored = await project()
        assert stored.target_accuracy == pytest.approx(0.95) and stored.name == "Project mine"

        # Without the CSRF token, or in a project the manager is not a member of: refused.
        assert (await boss.post("/projects/mine/edit", data={"name": "x"})).status_code == 403
        assert (await boss.get("/projects/theirs/edit")).status_code == 403

    async with httpx.AsyncClient(base_url=stack.web_url, timeout=30) as ann:
        assert (await _login(ann, "ann")).status_code == 303
        assert "/projects/mine/edit" not in (await ann.get("/projects/mine")).text
        refused = await ann.get("/projects/mine/edit")
        assert refused.status_code == 403 and "may not edit projects" in refused.text
        token = _csrf(await ann.get("/projects"))
        posted = await ann.post("/projects/mine/edit", data={"csrf": token, "name": "mine, by ann"})
        assert posted.status_code == 403
        assert (await project()).name == "Project mine"


async def test_a_service_down_gets_a_clear_page_not_a_trace(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.web_url, timeout=30) as ann:
        assert (await _login(ann, "ann")).status_code == 303
        token = _csrf(await ann.get("/projects"))
        review = await ann.get("/review")
        assert review.status_code == 200 and "mode=second" not in review.text
        await asyncio.to_thread(stack.processes["review"].terminate)
        # The list still shows (queue sizes blank); the screen's API and the status page say who is down.
        assert (await ann.get("/projects")).status_code == 200
        api = await ann.post("/api/projects/mine/next", json={}, headers={"X-CSRF-Token": token})
        assert api.status_code == 503 and api.json()["error"] == "unavailable"
        page = await ann.get("/projects/mine")
        assert page.status_code == 503
        assert "Service down" in page.text and "review service" in page.text
        assert "Traceback" not in page.text


def test_rules_the_pages_rely_on() -> None:
    from services.gen.tandem.review.v1 import review_pb2
    from services.web.tasks import shortcuts, task_json
    from services.web.views.manage import parse_labels

    ordinary = review_pb2.Task(task_id="t", suggested_label="yes", confidence=0.9, reason="uncertain")
    assert task_json(ordinary)["suggestion"] == {"label": "yes", "confidence": 0.9}
    # Audits, second opinions and the control arm never show the model's answer.
    for blind in (
        review_pb2.Task(suggested_label="yes", reason="audit"),
        review_pb2.Task(suggested_label="yes", reason="second_opinion", round=1),
        review_pb2.Task(suggested_label="yes", reason="uncertain", round=1),
        review_pb2.Task(suggested_label="yes", reason="control"),
        review_pb2.Task(suggested_label="yes", reason="gold"),
    ):
        assert task_json(blind)["suggestion"] is None
    keys = shortcuts(150)
    assert keys[:10] == [*"123456789", "a"] and "s" not in keys and "u" not in keys and keys[-1] == ""
    labels = parse_labels("billing: Invoices: charges and refunds\n\noutage\n")
    assert [(lb.name, lb.description) for lb in labels] == [
        ("billing", "Invoices: charges and refunds"),
        ("outage", ""),
    ]
    with pytest.raises(ValueError, match="twice"):
        parse_labels("a\na")
    # A task the review service sent without a suggestion shows none.
    assert task_json(review_pb2.Task(task_id="t", reason="uncertain"))["suggestion"] is None


def test_throughput_sampling_and_charts() -> None:
    from services.gen.tandem.stats.v1 import stats_pb2
    from services.web.charts import accuracy_chart, throughput_chart
    from services.web.throughput import Throughput, rates

    now = [0.0]
    ring = Throughput(window=600, capacity=2, clock=lambda: now[0])
    samples = ring.record("p", 0, 0)
    assert throughput_chart(samples) is None  # nothing to draw from a single point
    for step in range(1, 400):
        now[0] = step * 5.0
        # Two viewers refreshing at once add one point between them.
        ring.record("p", 12 * step, 6 * step)
        samples = ring.record("p", 12 * step, 6 * step)
    assert len(samples) == 121 and samples[0].at == now[0] - 600  # bounded by the window
    (segment,) = rates(samples)
    latest = segment[-1]
    assert latest.final_per_minute == pytest.approx(144) and latest.human_per_minute == pytest.approx(72)
    chart = throughput_chart(samples)
    assert chart is not None and chart.seconds == 600 and chart.y_ticks[-1].label == "150"
    assert [t.label for t in chart.x_ticks] == ["now", "−2 min", "−4 min", "−6 min", "−8 min", "−10 min"]
    # A page open for half a minute gets a one-minute axis.
    short = throughput_chart(samples[-7:])
    assert short is not None and [t.label for t in short.x_ticks] == [
        "now",
        "−15 s",
        "−30 s",
        "−45 s",
        "−1 min",
    ]
    # Nobody watching for a while: the line breaks instead of averaging over the gap.
    now[0] += 300
    samples = ring.record("p", 99_999, 99_999)
    for step in range(1, 6):
        now[0] += 5
        samples = ring.record("p", 99_999 + step, 99_999)
    assert len(rates(samples)) == 2
    # The least recently watched project is forgotten first.
    ring.record("q", 0, 0)
    ring.record("r", 0, 0)
    assert len(ring.record("p", 0, 0)) == 1

    assert accuracy_chart(stats_pb2.ScorerStats(), 0.95) is None
    scorer = stats_pb2.ScorerStats(
        estimated_accuracy=0.97,
        certified_accuracy=0.955,
        audited=40,
        audit_accuracy=0.9,
        audit_accuracy_low=0.77,
        audit_accuracy_high=0.96,
    )
    accuracy = accuracy_chart(scorer, 0.95)
    assert accuracy is not None and len(accuracy.rows) == 2
    assert accuracy.x_ticks[0].label == "75%" and accuracy.x_ticks[-1].label == "100%"
    (_, estimated), (_, audited) = accuracy.rows
    assert audited.low is not None and audited.high is not None
    assert audited.low < audited.point < audited.high and estimated.high == accuracy.plot.right


async def test_csv_uploads_keep_quoted_newlines() -> None:
    from services.gen.tandem.ingest.v1 import ingest_pb2 as pb
    from services.web.uploads import ingest_file

    class Chunks:
        def __init__(self, data: bytes) -> None:
            self._parts = [data[i : i + 7] for i in range(0, len(data), 7)]

        async def read_chunk(self, size: int = 0) -> bytes:
            return self._parts.pop(0) if self._parts else b""

    sent: list[pb.RawItem] = []

    async def submit(batch: pb.SubmitBatchRequest) -> pb.SubmitBatchResponse:
        sent.extend(batch.items)
        return pb.SubmitBatchResponse(accepted=len(batch.items))

    data = 'id,text,lang\n1,"two\nlines, one ""quote""",en\n2,caf\xe9 \xff,fr\n'.encode("latin-1")
    result = await ingest_file(
        Chunks(data), filename="x.csv", project_id="p", submit=submit, batch_items=1, max_bytes=1 << 20
    )
    assert result.accepted == 2 and result.rejected == 0
    assert sent[0].text == b'two\nlines, one "quote"' and dict(sent[0].metadata) == {"lang": "en"}
    # Bytes that are not UTF-8 reach the service as they were, for it to judge.
    assert sent[1].text == b"caf\xe9 \xff"


async def test_exports_in_every_format_download_as_one_file(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.web_url, timeout=30) as boss:
        await _login(boss, "boss")
        status = await boss.get("/projects/mine")
        assert 'name="format"' in status.text
        token = _csrf(status)
        refused = await boss.post("/projects/mine/exports", data={"csrf": token, "format": "xlsx"})
        assert refused.status_code == 400 and "Choose a format" in refused.text
        # No item has a final label yet: each file is the format's empty form.
        expected: dict[str, tuple[str, str, Callable[[bytes], bool]]] = {
            "csv": ("text/csv", ".csv", lambda body: body.startswith(b"id,")),
            "parquet": ("application/vnd.apache.parquet", ".parquet", lambda body: body[:4] == b"PAR1"),
            "label-studio": ("application/json", ".json", lambda body: body.strip() == b"[]"),
            "jsonl": ("application/x-ndjson", ".jsonl", lambda body: body == b""),
        }
        for name, (content_type, suffix, looks_right) in expected.items():
            created = await boss.post("/projects/mine/exports", data={"csrf": token, "format": name})
            assert created.status_code == 303, created.text
            page = await boss.get(created.headers["location"])
            assert "Download" in page.text
            download = await boss.get(created.headers["location"] + "/download")
            assert download.status_code == 200
            assert download.headers["content-type"].startswith(content_type), name
            assert download.headers["content-disposition"].endswith(f'{suffix}"'), name
            assert looks_right(download.content), (name, download.content[:80])
