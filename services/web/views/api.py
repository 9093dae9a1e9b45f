"""The labeling screen's JSON API: claim the next task, submit, skip, extend, release.

Each handler is one gRPC call on the person's own token (two when NextTask hands back a task
this session skipped), so the path stays at a few milliseconds in the app.
"""

from __future__ import annotations

import contextlib
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

# A skipped task is open again at once with its old priority, so NextTask hands it straight back
# to whoever asks next, the person who skipped it included. Such a task is held while the next
# one is claimed (a held task is not offered again) and given back afterwards; past this many in a
# row the person is told only skipped tasks are left.
SKIP_RETRIES = 5


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


async def next_task(request: web.Request) -> web.StreamResponse:
    _may_label(request)
    st, project_id = app_state(request), request.match_info["project_id"]
    skipped = session(request).skipped
    body = await _body(request)
    lease_seconds = body.get("lease_seconds", 0)
    if not isinstance(lease_seconds, int | float) or not 0 <= lease_seconds <= 3600:
        raise bad_request("lease_seconds must be between 0 and 3600.")
    if body.get("include_skipped") is True:
        skipped.clear()
    held: list[review_pb2.Task] = []
    try:
        for _ in range(SKIP_RETRIES + 1):
            try:
                task = await st.backends.review.NextTask(
                    review_pb2.NextTaskRequest(project_id=project_id, lease_seconds=float(lease_seconds)),
                    **auth(request),
                )
            except grpc.aio.AioRpcError as error:
                if error.code() is grpc.StatusCode.NOT_FOUND:
                    return web.json_response(
                        {"task": None, "only_skipped": bool(held), "server_ms": now_ms()}
                    )
                raise
            if task.task_id not in skipped:
                return web.json_response({"task": task_json(task), "server_ms": now_ms()})
            held.append(task)
        return web.json_response({"task": None, "only_skipped": True, "server_ms": now_ms()})
    finally:
        await _give_back(request, held)


async def _give_back(request: web.Request, tasks: list[review_pb2.Task]) -> None:
    review = app_state(request).backends.review
    for task in tasks:
        # Best effort: a task not given back returns to the queue when its lease runs out.
        with contextlib.suppress(grpc.aio.AioRpcError):
            await review.SkipTask(
                review_pb2.SkipTaskRequest(
                    task_id=task.task_id, lease_id=task.lease_id, reason="skipped earlier"
                ),
                **auth(request),
            )


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
    session(request).skipped.append(task_id)
    day = st.progress.skipped(principal(request).user_id)
    return web.json_response({"skipped": True, "progress": day.as_json()})


async def release(request: web.Request) -> web.StreamResponse:
    """Tasks the screen held when the person left: back to the queue at once rather than when
    their leases run out."""
    _may_label(request)
    task_id = request.match_info["task_id"]
    body = await _body(request)
    await app_state(request).backends.review.SkipTask(
        review_pb2.SkipTaskRequest(task_id=task_id, lease_id=_lease(body), reason="released"),
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
