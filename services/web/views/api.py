"""The labeling screen's JSON API: claim the next task, submit, skip, extend, release.

Each handler is one gRPC call on the person's own token, so the path stays at a few
milliseconds in the app.
"""

from __future__ import annotations

import math
from typing import Any

import grpc
from aiohttp import web

from services.common.auth import Action
from services.gen.tandem.review.v1 import review_pb2
from services.web.errors import bad_request, forbidden
from services.web.metrics import LABELS
from services.web.state import app_state, auth, principal, session
from services.web.tasks import now_ms, task_json

# Projects counted per session for the "show the tasks I skipped" offer: the project id comes
# from the browser, so the count of distinct ones is capped.
MAX_SKIP_PROJECTS = 100


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError as exc:
        raise bad_request("The request body is not JSON.") from exc
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


def _lease(body: dict[str, Any]) -> str:
    lease_id = body.get("lease_id")
    if not isinstance(lease_id, str) or not lease_id:
        raise bad_request("lease_id is required.")
    return lease_id


def _may_label(request: web.Request) -> None:
    who = principal(request)
    if not who.may(Action.LABEL):
        raise forbidden(f"A {who.role} may not label.")


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false.")
    return value


async def next_task(request: web.Request) -> web.StreamResponse:
    """The next task for this person. The review service never hands a person a task they skipped
    unless `include_skipped` is set; `second_opinions_only` limits the queue to round ≥ 1."""
    _may_label(request)
    st, project_id = app_state(request), request.match_info["project_id"]
    skips = session(request).skips
    body = await _body(request)
    lease_seconds = body.get("lease_seconds", 0)
    if not isinstance(lease_seconds, int | float) or not 0 <= lease_seconds <= 3600:
        raise bad_request("lease_seconds must be between 0 and 3600.")
    include_skipped = _flag(body, "include_skipped")
    second_only = _flag(body, "second_opinions_only")
    try:
        task = await st.backends.review.NextTask(
            review_pb2.NextTaskRequest(
                project_id=project_id,
                lease_seconds=float(lease_seconds),
                second_opinions_only=second_only,
                include_skipped=include_skipped,
            ),
            **auth(request),
        )
    except grpc.aio.AioRpcError as error:
        if error.code() is not grpc.StatusCode.NOT_FOUND:
            raise
        if include_skipped and not second_only:
            # Nothing at all waits, skipped tasks included: no offer to show them until the next skip.
            skips.pop(project_id, None)
        return web.json_response(
            {"task": None, "skipped_before": skips[project_id] > 0, "server_ms": now_ms()}
        )
    return web.json_response({"task": task_json(task), "server_ms": now_ms()})


async def submit(request: web.Request) -> web.StreamResponse:
    _may_label(request)
    st, task_id = app_state(request), request.match_info["task_id"]
    body = await _body(request)
    label = body.get("label")
    seconds = body.get("seconds_spent", 0.0)
    if not isinstance(label, str) or not label:
        raise bad_request("label is required.")
    if not isinstance(seconds, int | float) or not math.isfinite(seconds) or seconds < 0:
        raise bad_request("seconds_spent must be a number of seconds.")
    answer = await st.backends.review.SubmitLabel(
        review_pb2.SubmitLabelRequest(
            task_id=task_id, lease_id=_lease(body), label=label, seconds_spent=float(seconds)
        ),
        **auth(request),
    )
    day = st.progress.today(principal(request).user_id)
    if answer.accepted:
        day = st.progress.labeled(principal(request).user_id, float(seconds))
        LABELS.inc()
    return web.json_response({"accepted": answer.accepted, "progress": day.as_json()})


async def skip(request: web.Request) -> web.StreamResponse:
    _may_label(request)
    st, task_id = app_state(request), request.match_info["task_id"]
    body = await _body(request)
    reason = body.get("reason", "")
    await st.backends.review.SkipTask(
        review_pb2.SkipTaskRequest(
            task_id=task_id, lease_id=_lease(body), reason=reason if isinstance(reason, str) else ""
        ),
        **auth(request),
    )
    project_id = body.get("project_id")
    skips = session(request).skips
    if isinstance(project_id, str) and (project_id in skips or len(skips) < MAX_SKIP_PROJECTS):
        skips[project_id] += 1
    day = st.progress.skipped(principal(request).user_id)
    return web.json_response({"skipped": True, "progress": day.as_json()})


async def release(request: web.Request) -> web.StreamResponse:
    """Tasks the screen held when the person left: back to the queue at once rather than when
    their leases run out. Not a skip: the person may be handed them again."""
    _may_label(request)
    task_id = request.match_info["task_id"]
    body = await _body(request)
    await app_state(request).backends.review.SkipTask(
        review_pb2.SkipTaskRequest(task_id=task_id, lease_id=_lease(body), reason="released", release=True),
        **auth(request),
    )
    return web.json_response({"released": True})


async def extend(request: web.Request) -> web.StreamResponse:
    _may_label(request)
    task_id = request.match_info["task_id"]
    body = await _body(request)
    task = await app_state(request).backends.review.ExtendLease(
        review_pb2.ExtendLeaseRequest(task_id=task_id, lease_id=_lease(body)), **auth(request)
    )
    return web.json_response({"lease_expires_unix_ms": task.lease_expires_unix_ms, "server_ms": now_ms()})
