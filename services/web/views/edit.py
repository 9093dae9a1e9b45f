"""Edit a project: what may change once items flow (UpdateProject), and, read-only, what may not.

The form posts every editable value; only those that differ from the project as it stands go to
UpdateProject, by name. The fixed settings (labels, target, guarantee, delta, human error) are
shown, not offered: the certificate in progress tests them. A post that names one anyway (a
script, an old form) is passed on, and the ingest service's refusal is shown on the form.
"""

from __future__ import annotations

from typing import Any

import grpc
from aiohttp import web
from multidict import MultiDictProxy

from services.common.auth import Action
from services.gen.tandem.ingest.v1 import ingest_pb2
from services.gen.tandem.projects.v1 import projects_pb2
from services.web.state import app_state, auth, render
from services.web.views.manage import _number, _project, _require

# What the confirmation calls each field UpdateProject takes.
EDITABLE: dict[str, str] = {
    "name": "name",
    "instructions": "instructions",
    "label_descriptions": "label descriptions",
    "hide_suggestions": "suggestion setting",
    "human_budget_items": "human budget (items)",
    "human_budget_share": "human budget (share)",
}
# Posted under the field's own name, these are passed on for the service to refuse.
FIXED_NUMBERS = ("target_accuracy", "delta", "human_error")
# How long the other services may keep the old definition (ProjectDirectory's cache,
# services/common/projects.py); this app reads it from ingest on every page.
PROPAGATION_SECONDS = 10


def _text(value: str) -> str:
    # Browsers post a textarea's line breaks as CRLF: an untouched text must compare equal.
    return value.replace("\r\n", "\n").strip()


def form_of(project: projects_pb2.Project) -> dict[str, Any]:
    """The form's values for a project as it stands."""
    return {
        "name": project.name,
        "instructions": project.instructions,
        "descriptions": [lb.description for lb in project.labels],
        "human_budget_items": str(project.human_budget_items) if project.human_budget_items else "",
        "human_budget_share": f"{project.human_budget_share:g}" if project.human_budget_share else "",
        "show_suggestions": not project.hide_suggestions,
    }


def changes_from(
    current: projects_pb2.Project, posted: MultiDictProxy[Any]
) -> tuple[projects_pb2.Project, list[str]]:
    """The values that differ from `current`, and their field names. A field missing from the
    post is left as it is; a malformed value raises ValueError with what to fix."""
    changes = projects_pb2.Project()
    fields: list[str] = []
    if "name" in posted:
        name = str(posted["name"]).strip() or current.project_id
        if name != current.name:
            changes.name = name
            fields.append("name")
    if "instructions" in posted:
        instructions = _text(str(posted["instructions"]))
        if instructions != _text(current.instructions):
            changes.instructions = instructions
            fields.append("instructions")
    descriptions = [str(v).strip() for v in posted.getall("label_description", [])]
    if descriptions:
        if len(descriptions) != len(current.labels):
            raise ValueError(
                f"the form has {len(descriptions)} label descriptions for {len(current.labels)} labels: "
                "the project changed meanwhile, reload the page"
            )
        if descriptions != [lb.description for lb in current.labels]:
            changes.labels.extend(
                projects_pb2.LabelDef(name=lb.name, description=d)
                for lb, d in zip(current.labels, descriptions, strict=True)
            )
            fields.append("label_descriptions")
    # The form sends a hidden "off" before the checkbox: absent altogether, the setting is kept.
    shown = [str(v) for v in posted.getall("show_suggestions", [])]
    if shown and ("on" not in shown) != current.hide_suggestions:
        changes.hide_suggestions = "on" not in shown
        fields.append("hide_suggestions")
    form = {k: str(posted[k]) for k in ("human_budget_items", "human_budget_share") if k in posted}
    if "human_budget_items" in form:
        items = _number(form, "human_budget_items", int, 0, 10**12)
        if items != current.human_budget_items:
            changes.human_budget_items = items
            fields.append("human_budget_items")
    if "human_budget_share" in form:
        share = _number(form, "human_budget_share", float, 0, 1)
        if share != current.human_budget_share:
            changes.human_budget_share = share
            fields.append("human_budget_share")
    for key in FIXED_NUMBERS:
        if key in posted:
            try:
                value = float(str(posted[key]))
            except ValueError as exc:
                raise ValueError(f"{key.replace('_', ' ')} must be a number") from exc
            if value != getattr(current, key):
                setattr(changes, key, value)
                fields.append(key)
    if "guarantee" in posted and str(posted["guarantee"]) != current.guarantee:
        changes.guarantee = str(posted["guarantee"])
        fields.append("guarantee")
    return changes, fields


def _page(
    request: web.Request,
    project: projects_pb2.Project,
    *,
    form: dict[str, Any],
    status: int = 200,
    error: str = "",
    saved: list[str] | None = None,
    unchanged: bool = False,
) -> web.Response:
    return render(
        request,
        "project_edit.html",
        status=status,
        project=project,
        form=form,
        error=error,
        saved=[EDITABLE[f] for f in saved or []],
        unchanged=unchanged,
        propagation_seconds=PROPAGATION_SECONDS,
    )


async def edit_form(request: web.Request) -> web.StreamResponse:
    _require(request, Action.EDIT_PROJECT, "edit projects")
    project = await _project(request)
    # After a save (post, redirect, get): which fields changed, for the confirmation.
    saved = [f for f in request.query.get("saved", "").split(",") if f in EDITABLE]
    return _page(request, project, form=form_of(project), saved=saved)


async def update_project(request: web.Request) -> web.StreamResponse:
    _require(request, Action.EDIT_PROJECT, "edit projects")
    current = await _project(request)
    posted = await request.post()
    # Shown again as posted, so a refusal does not throw away the person's edits.
    form = form_of(current)
    texts = ("name", "instructions", "human_budget_items", "human_budget_share")
    form.update({k: str(posted[k]) for k in texts if k in posted})
    if "show_suggestions" in posted:
        form["show_suggestions"] = "on" in posted.getall("show_suggestions")
    posted_descriptions = [str(v) for v in posted.getall("label_description", [])]
    if len(posted_descriptions) == len(current.labels):
        form["descriptions"] = posted_descriptions
    try:
        changes, fields = changes_from(current, posted)
    except ValueError as exc:
        return _page(request, current, form=form, status=400, error=str(exc))
    if not fields:
        return _page(request, current, form=form, unchanged=True)
    try:
        updated = await app_state(request).backends.ingest.UpdateProject(
            ingest_pb2.UpdateProjectRequest(project_id=current.project_id, changes=changes, fields=fields),
            **auth(request),
        )
    except grpc.aio.AioRpcError as error:
        if error.code() is not grpc.StatusCode.INVALID_ARGUMENT:
            raise  # PERMISSION_DENIED → the 403 page, and so on (middleware.failures)
        return _page(request, current, form=form, status=400, error=error.details() or "refused")
    raise web.HTTPSeeOther(f"/projects/{updated.project_id}/edit?saved={','.join(fields)}")
