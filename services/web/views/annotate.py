"""The people's pages: my projects, the labeling screen, second opinions for reviewers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from services.common.auth import Action
from services.gen.tandem.ingest.v1 import ingest_pb2
from services.gen.tandem.projects.v1 import projects_pb2
from services.gen.tandem.stats.v1 import stats_pb2
from services.web.errors import forbidden
from services.web.state import app_state, auth, principal, render
from services.web.tasks import shortcuts

# The screen extends the leases it holds only for a person active within this window; one who
# walks away lets them lapse and the tasks return to the queue.
IDLE_SECONDS = 300.0
# A submitted label waits this long in the browser before it is sent, so U can take it back.
UNDO_SECONDS = 4


async def home(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther("/projects")


async def _projects(request: web.Request) -> list[projects_pb2.Project]:
    # Ingest lists the caller's projects only (all of them for an admin): no filter of our own.
    answer = await app_state(request).backends.ingest.ListProjects(
        ingest_pb2.ListProjectsRequest(), **auth(request)
    )
    return sorted(answer.projects, key=lambda p: p.project_id)


async def _part_stats(request: web.Request, service: str, project_id: str) -> stats_pb2.ProjectStats:
    stub = app_state(request).backends.stats_of[service]
    answer: stats_pb2.ProjectStats = await stub.GetProjectStats(
        stats_pb2.GetProjectStatsRequest(project_id=project_id), **auth(request)
    )
    return answer


async def my_projects(request: web.Request) -> web.StreamResponse:
    projects = await _projects(request)
    queues = await asyncio.gather(
        *(_part_stats(request, "review", p.project_id) for p in projects), return_exceptions=True
    )
    rows = [
        {"project": p, "queue": q.review if isinstance(q, stats_pb2.ProjectStats) else None}
        for p, q in zip(projects, queues, strict=True)
    ]
    who = principal(request)
    today = app_state(request).progress.today(who.user_id)
    return render(request, "projects.html", rows=rows, today=today)


async def label_screen(request: web.Request) -> web.StreamResponse:
    who = principal(request)
    if not who.may(Action.LABEL):
        raise forbidden(f"A {who.role} may not label.")
    project_id = request.match_info["project_id"]
    project = await app_state(request).backends.ingest.GetProject(
        ingest_pb2.GetProjectRequest(project_id=project_id), **auth(request)
    )
    keys = shortcuts(len(project.labels))
    labels = [
        {"index": i, "name": lb.name, "description": lb.description, "key": keys[i]}
        for i, lb in enumerate(project.labels)
    ]
    # ?mode=second: second opinions only (round ≥ 1), for reviewers working through them; the
    # ordinary queue serves them first anyway.
    second = request.query.get("mode") == "second"
    config = {
        "project_id": project.project_id,
        "idle_seconds": IDLE_SECONDS,
        "undo_seconds": UNDO_SECONDS,
        "second_opinions_only": second,
    }
    today = app_state(request).progress.today(who.user_id)
    return render(
        request,
        "label.html",
        project=project,
        labels=labels,
        many=len(labels) > 9,
        config=json.dumps(config),
        today=today,
        undo_seconds=UNDO_SECONDS,
        second=second,
    )


async def review_page(request: web.Request) -> web.StreamResponse:
    who = principal(request)
    if not who.may(Action.LABEL):
        raise forbidden(f"A {who.role} may not label.")
    projects = await _projects(request)

    async def both(project_id: str) -> tuple[Any, Any]:
        return await asyncio.gather(
            _part_stats(request, "scorer", project_id), _part_stats(request, "review", project_id)
        )

    parts = await asyncio.gather(*(both(p.project_id) for p in projects), return_exceptions=True)
    rows = []
    for project, part in zip(projects, parts, strict=True):
        if isinstance(part, BaseException):
            rows.append({"project": project, "scorer": None, "review": None})
        else:
            rows.append({"project": project, "scorer": part[0].scorer, "review": part[1].review})
    return render(request, "review.html", rows=rows)
