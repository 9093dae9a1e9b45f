"""Managers' workforce pages: a project's quality figures, pauses, gold questions and workforce
settings (`/projects/{p}/workforce`), and the pools with their people (`/pools`).

Everything goes through the review service's WorkforceService and ingest's UpdateProject with the
person's own token; the pages are offered to those whose role may manage the workforce (admins,
managers), and the services check every call again.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import Any
from urllib.parse import urlencode

import grpc
from aiohttp import BodyPartReader, web
from multidict import MultiDictProxy

from services.common.auth import Action
from services.gen.tandem.identity.v1 import identity_pb2
from services.gen.tandem.ingest.v1 import ingest_pb2
from services.gen.tandem.projects.v1 import projects_pb2
from services.gen.tandem.workforce.v1 import workforce_pb2
from services.web.errors import bad_request
from services.web.gold import GoldResult, add_gold_file
from services.web.state import app_state, auth, render
from services.web.uploads import UploadError
from services.web.views.manage import _number, _project, _require, checked_multipart

SHOWN_KAPPAS = 10
METHODS = {"dawid_skene": "Dawid-Skene", "majority_vote": "majority vote"}
# What the confirmation calls each workforce field of UpdateProject.
SETTINGS: dict[str, str] = {
    "pools": "pools",
    "skill_fields": "skill fields",
    "overlap": "overlap",
    "max_overlap": "maximum overlap",
    "overlap_below_confidence": "overlap below confidence",
    "sla_seconds": "SLA",
    "gold_first": "first tasks with more gold",
    "gold_first_share": "gold share of the first tasks",
    "gold_share": "gold share",
    "quality_bar": "quality bar",
}
# The numeric settings: (kind, lowest, highest), as ingest validates them (services/ingest/service.py).
NUMBERS: dict[str, tuple[type[int] | type[float], float, float]] = {
    "overlap": (int, 0, 10),
    "max_overlap": (int, 0, 10),
    "overlap_below_confidence": (float, 0, 1),
    "sla_seconds": (float, 0, 365 * 86400),
    "gold_first": (int, 0, 1000),
    "gold_first_share": (float, 0, 1),
    "gold_share": (float, 0, 1),
    "quality_bar": (float, 0, 1),
}


def _may(request: web.Request) -> None:
    _require(request, Action.MANAGE_WORKFORCE, "manage the workforce")


def _listed(values: str) -> list[str]:
    """Comma- or line-separated values (a skill's value may hold spaces, so not space-separated)."""
    return list(dict.fromkeys(v.strip() for v in values.replace("\n", ",").split(",") if v.strip()))


# --- a project's workforce: settings --------------------------------------------------------------


def settings_form(project: projects_pb2.Project) -> dict[str, str]:
    """The settings form's values for a project as it stands ("" = the default)."""
    form = {
        "pools": "\n".join(f"{p.pool_id}={p.share:g}" for p in project.pools),
        "skill_fields": ", ".join(project.skill_fields),
        "overlap": str(max(project.overlap, 1)),
    }
    for key in NUMBERS:
        if key != "overlap":
            value = getattr(project, key)
            form[key] = f"{value:g}" if value else ""
    return form


def parse_pools(text: str) -> list[tuple[str, float]]:
    """One pool per line (or comma-separated), `pool=share`; a pool alone has share 1."""
    out: list[tuple[str, float]] = []
    for spec in _listed(text):
        pool_id, eq, share_text = spec.partition("=")
        try:
            share = float(share_text) if eq else 1.0
        except ValueError as exc:
            raise ValueError(
                f"pools are pool=share, one per line: {spec!r} has no number for its share"
            ) from exc
        out.append((pool_id.strip(), share))
    return out


def settings_changes(
    current: projects_pb2.Project, posted: MultiDictProxy[Any]
) -> tuple[projects_pb2.Project, list[str]]:
    """The workforce values that differ from `current`, and their field names; a field missing
    from the post stays as it is. A malformed value raises ValueError with what to fix."""
    changes = projects_pb2.Project()
    fields: list[str] = []
    if "pools" in posted:
        pools = parse_pools(str(posted["pools"]))
        if pools != [(p.pool_id, p.share) for p in current.pools]:
            changes.pools.extend(projects_pb2.PoolShare(pool_id=p, share=s) for p, s in pools)
            fields.append("pools")
    if "skill_fields" in posted:
        skill_fields = _listed(str(posted["skill_fields"]))
        if skill_fields != list(current.skill_fields):
            changes.skill_fields.extend(skill_fields)
            fields.append("skill_fields")
    form = {k: str(posted[k]) for k in NUMBERS if k in posted}
    for key, (kind, low, high) in NUMBERS.items():
        if key not in form:
            continue
        value = _number(form, key, kind, low, high)
        now = getattr(current, key)
        if key == "overlap":
            # Ingest keeps at least 1: an empty box and "1" are the same setting.
            value, now = max(value, 1), max(now, 1)
        if value != now:
            setattr(changes, key, value)
            fields.append(key)
    return changes, fields


# --- a project's workforce: the page --------------------------------------------------------------


async def _page(
    request: web.Request,
    project: projects_pb2.Project,
    *,
    form: dict[str, str] | None = None,
    error: str = "",
    status: int = 200,
    gold: GoldResult | None = None,
    unchanged: bool = False,
) -> web.Response:
    backends = app_state(request).backends
    quality, pools = await asyncio.gather(
        backends.workforce.GetQuality(
            workforce_pb2.GetQualityRequest(project_id=project.project_id), **auth(request)
        ),
        backends.workforce.ListPools(workforce_pb2.ListPoolsRequest(), **auth(request)),
    )
    saved = [SETTINGS[f] for f in request.query.get("saved", "").split(",") if f in SETTINGS]
    alpha = quality.krippendorff_alpha
    return render(
        request,
        "workforce.html",
        status=status,
        project=project,
        quality=quality,
        annotators=sorted(quality.annotators, key=lambda a: a.annotator_id),
        kappas=sorted(quality.kappas, key=lambda k: k.kappa)[:SHOWN_KAPPAS],
        method=METHODS.get(quality.method, quality.method or "—"),
        alpha="—" if math.isnan(alpha) else f"{alpha:.3f}",
        pool_ids=[p.pool_id for p in pools.pools],
        form=form or settings_form(project),
        error=error,
        saved=saved,
        paused=request.query.get("paused", ""),
        resumed=request.query.get("resumed", ""),
        gold=gold,
        unchanged=unchanged,
    )


async def workforce_page(request: web.Request) -> web.StreamResponse:
    _may(request)
    return await _page(request, await _project(request))


async def update_settings(request: web.Request) -> web.StreamResponse:
    _may(request)
    current = await _project(request)
    posted = await request.post()
    # Shown again as posted, so a refusal does not throw away the person's edits.
    form = settings_form(current)
    form.update({k: str(posted[k]) for k in form if k in posted})
    try:
        changes, fields = settings_changes(current, posted)
    except ValueError as exc:
        return await _page(request, current, form=form, status=400, error=str(exc))
    if not fields:
        return await _page(request, current, form=form, unchanged=True)
    try:
        await app_state(request).backends.ingest.UpdateProject(
            ingest_pb2.UpdateProjectRequest(project_id=current.project_id, changes=changes, fields=fields),
            **auth(request),
        )
    except grpc.aio.AioRpcError as error:
        if error.code() is not grpc.StatusCode.INVALID_ARGUMENT:
            raise
        return await _page(request, current, form=form, status=400, error=error.details() or "refused")
    raise web.HTTPSeeOther(f"/projects/{current.project_id}/workforce?saved={','.join(fields)}#settings")


async def set_paused(request: web.Request) -> web.StreamResponse:
    _may(request)
    project_id = request.match_info["project_id"]
    posted = await request.post()
    annotator_id = str(posted.get("annotator_id", "")).strip()
    action = str(posted.get("action", ""))
    if action not in ("pause", "resume"):
        raise bad_request("Unknown change: pause or resume.")
    if not annotator_id:
        return await _page(request, await _project(request), status=400, error="Enter the person's user id.")
    await app_state(request).backends.workforce.SetPaused(
        workforce_pb2.SetPausedRequest(
            project_id=project_id,
            annotator_id=annotator_id,
            paused=action == "pause",
            reason=str(posted.get("reason", "")).strip() if action == "pause" else "",
        ),
        **auth(request),
    )
    done = "paused" if action == "pause" else "resumed"
    raise web.HTTPSeeOther(f"/projects/{project_id}/workforce?{urlencode({done: annotator_id})}")


async def upload_gold(request: web.Request) -> web.StreamResponse:
    _may(request)
    st = app_state(request)
    reader = await checked_multipart(request)
    project = await _project(request)
    part = await reader.next()
    if not isinstance(part, BodyPartReader) or part.name != "file" or not part.filename:
        return await _page(
            request, project, status=400, error="Choose a JSONL or CSV file of gold questions."
        )

    async def send(items: list[workforce_pb2.GoldItem]) -> workforce_pb2.AddGoldResponse:
        answer: workforce_pb2.AddGoldResponse = await st.backends.workforce.AddGold(
            workforce_pb2.AddGoldRequest(project_id=project.project_id, items=items), **auth(request)
        )
        return answer

    try:
        result = await add_gold_file(
            part,
            filename=part.filename,
            labels=[lb.name for lb in project.labels],
            send=send,
            max_bytes=st.settings.max_upload_bytes,
        )
    except UploadError as exc:
        return await _page(request, project, status=400, error=str(exc))
    except grpc.aio.AioRpcError as error:
        if error.code() is not grpc.StatusCode.INVALID_ARGUMENT:
            raise
        return await _page(request, project, status=400, error=error.details() or "refused")
    return await _page(request, project, gold=result)


# --- pools ----------------------------------------------------------------------------------------

POOL_FORM = {"pool_id": "", "name": "", "max_leased": "", "vendor_user_id": ""}
ANNOTATOR_FORM = {"annotator_id": "", "pool_id": "", "skills": "", "max_leased": ""}


async def _pools_page(
    request: web.Request,
    *,
    error: str = "",
    status: int = 200,
    pool_form: dict[str, str] | None = None,
    annotator_form: dict[str, str] | None = None,
) -> web.Response:
    backends = app_state(request).backends
    pools, people = await asyncio.gather(
        backends.workforce.ListPools(workforce_pb2.ListPoolsRequest(), **auth(request)),
        backends.workforce.ListAnnotators(workforce_pb2.ListAnnotatorsRequest(), **auth(request)),
    )
    user_ids: list[str] = []
    # Suggestions for the user id box only; a manager who may not list users types the id.
    with contextlib.suppress(grpc.aio.AioRpcError):
        users = await backends.identity.ListUsers(identity_pb2.ListUsersRequest(), **auth(request))
        user_ids = sorted(u.user_id for u in users.users if not u.disabled)
    counts: dict[str, int] = {}
    for a in people.annotators:
        counts[a.pool_id] = counts.get(a.pool_id, 0) + 1
    return render(
        request,
        "pools.html",
        status=status,
        pools=list(pools.pools),
        counts=counts,
        annotators=list(people.annotators),
        user_ids=user_ids,
        pool_form=pool_form or POOL_FORM,
        annotator_form=annotator_form or ANNOTATOR_FORM,
        error=error,
    )


async def pools_page(request: web.Request) -> web.StreamResponse:
    _may(request)
    return await _pools_page(request)


async def _posted(request: web.Request, keys: dict[str, str]) -> dict[str, str]:
    posted = await request.post()
    return {k: str(posted.get(k, "")).strip() for k in keys}


async def put_pool(request: web.Request) -> web.StreamResponse:
    _may(request)
    form = await _posted(request, POOL_FORM)
    try:
        pool = workforce_pb2.Pool(
            pool_id=form["pool_id"],
            name=form["name"],
            max_leased=_number(form, "max_leased", int, 0, 10**6),
            vendor_user_id=form["vendor_user_id"],
        )
        await app_state(request).backends.workforce.PutPool(pool, **auth(request))
    except ValueError as exc:
        return await _pools_page(request, error=str(exc), status=400, pool_form=form)
    except grpc.aio.AioRpcError as error:
        if error.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS):
            raise
        return await _pools_page(request, error=error.details() or "refused", status=400, pool_form=form)
    raise web.HTTPSeeOther("/pools")


async def put_annotator(request: web.Request) -> web.StreamResponse:
    _may(request)
    form = await _posted(request, ANNOTATOR_FORM)
    try:
        person = workforce_pb2.Annotator(
            annotator_id=form["annotator_id"],
            pool_id=form["pool_id"],
            skills=_listed(form["skills"]),
            max_leased=_number(form, "max_leased", int, 0, 10**6),
        )
        await app_state(request).backends.workforce.PutAnnotator(person, **auth(request))
    except ValueError as exc:
        return await _pools_page(request, error=str(exc), status=400, annotator_form=form)
    except grpc.aio.AioRpcError as error:
        if error.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
            raise
        return await _pools_page(request, error=error.details() or "refused", status=400, annotator_form=form)
    raise web.HTTPSeeOther("/pools")
