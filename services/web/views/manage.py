"""Managers' pages: create a project, upload items, watch its status, export its labels."""

from __future__ import annotations

import logging
import re
from typing import Any

import grpc
from aiohttp import BodyPartReader, MultipartReader, web

from services.common.auth import Action
from services.gen.tandem.export.v1 import export_pb2
from services.gen.tandem.ingest.v1 import ingest_pb2
from services.gen.tandem.projects.v1 import projects_pb2
from services.web.charts import accuracy_chart, throughput_chart
from services.web.errors import Failure, bad_request, forbidden, not_found
from services.web.metrics import UPLOADED
from services.web.session import CSRF_FIELD
from services.web.state import app_state, auth, principal, render, session_token
from services.web.throughput import WINDOW_SECONDS
from services.web.uploads import UploadError, UploadResult, ingest_file

log = logging.getLogger(__name__)

PROJECT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
STATUS_REFRESH_SECONDS = 5
EXPORT_TIMEOUT_SECONDS = 3600.0


def _require(request: web.Request, action: Action, what: str) -> None:
    who = principal(request)
    if not who.may(action):
        raise forbidden(f"A {who.role} may not {what}.")


async def _project(request: web.Request) -> projects_pb2.Project:
    project: projects_pb2.Project = await app_state(request).backends.ingest.GetProject(
        ingest_pb2.GetProjectRequest(project_id=request.match_info["project_id"]), **auth(request)
    )
    return project


# --- create ---------------------------------------------------------------------------------------

FORM_DEFAULTS: dict[str, str] = {
    "project_id": "",
    "name": "",
    "labels": "",
    "instructions": "",
    "target_accuracy": "0.95",
    "guarantee": "dataset",
    "human_budget_items": "",
    "human_budget_share": "",
    # A checkbox: "on" when ticked, absent from the post when not.
    "show_suggestions": "on",
}


def parse_labels(text: str) -> list[projects_pb2.LabelDef]:
    """One label per line, `name: description` (the description is optional)."""
    labels: list[projects_pb2.LabelDef] = []
    seen: set[str] = set()
    for line in text.splitlines():
        if not line.strip():
            continue
        name, _, description = line.partition(":")
        name = name.strip()
        if not name:
            raise ValueError(f"a label line has no name: {line.strip()!r}")
        if name in seen:
            raise ValueError(f"label {name!r} appears twice")
        seen.add(name)
        labels.append(projects_pb2.LabelDef(name=name, description=description.strip()))
    if len(labels) < 2:
        raise ValueError("a project needs at least two labels, one per line")
    return labels


def _number(form: dict[str, str], key: str, kind: type[float] | type[int], low: float, high: float) -> Any:
    raw = form.get(key, "").strip()
    if not raw:
        return kind(0)
    try:
        value = kind(raw)
    except ValueError as exc:
        raise ValueError(f"{key.replace('_', ' ')} must be a number") from exc
    if not low <= value <= high:
        raise ValueError(f"{key.replace('_', ' ')} must be between {low:g} and {high:g}")
    return value


def project_from_form(form: dict[str, str]) -> projects_pb2.Project:
    project_id = form.get("project_id", "").strip()
    if not PROJECT_ID.match(project_id):
        raise ValueError("the project id must be lower-case letters, digits, '-' or '_' (at most 63)")
    guarantee = form.get("guarantee", "dataset")
    if guarantee not in ("dataset", "automatic"):
        raise ValueError("the guarantee is 'dataset' or 'automatic'")
    return projects_pb2.Project(
        project_id=project_id,
        name=form.get("name", "").strip() or project_id,
        labels=parse_labels(form.get("labels", "")),
        instructions=form.get("instructions", "").strip(),
        target_accuracy=_number(form, "target_accuracy", float, 0.5, 0.9999),
        guarantee=guarantee,
        human_budget_items=_number(form, "human_budget_items", int, 0, 10**12),
        human_budget_share=_number(form, "human_budget_share", float, 0, 1),
        hide_suggestions=form.get("show_suggestions", "on") != "on",
    )


async def new_project_form(request: web.Request) -> web.StreamResponse:
    _require(request, Action.CREATE_PROJECT, "create projects")
    return render(request, "project_new.html", form=FORM_DEFAULTS, error="")


async def create_project(request: web.Request) -> web.StreamResponse:
    _require(request, Action.CREATE_PROJECT, "create projects")
    posted = await request.post()
    form = {k: str(posted.get(k, "")) for k in FORM_DEFAULTS}
    try:
        project = project_from_form(form)
        created = await app_state(request).backends.ingest.CreateProject(
            ingest_pb2.CreateProjectRequest(project=project), **auth(request)
        )
    except ValueError as exc:
        return render(request, "project_new.html", status=400, form=form, error=str(exc))
    except grpc.aio.AioRpcError as error:
        if error.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS):
            raise
        return render(request, "project_new.html", status=400, form=form, error=error.details() or "refused")
    raise web.HTTPSeeOther(f"/projects/{created.project_id}")


# --- status ---------------------------------------------------------------------------------------


async def status(request: web.Request) -> web.StreamResponse:
    project = await _project(request)
    st = app_state(request)
    stats = await st.backends.stats(project.project_id, auth(request))
    # The page refreshes itself: each view is a point of the throughput chart.
    samples = st.throughput.record(project.project_id, stats.export.finalized, stats.review.done)
    return render(
        request,
        "status.html",
        project=project,
        stats=stats,
        refresh=STATUS_REFRESH_SECONDS,
        sources=sorted(stats.export.by_source.items()),
        throughput=throughput_chart(samples),
        accuracy=accuracy_chart(stats.scorer, project.target_accuracy),
        window_minutes=int(WINDOW_SECONDS // 60),
    )


# --- upload ---------------------------------------------------------------------------------------


def _upload_page(
    request: web.Request,
    project: projects_pb2.Project,
    *,
    result: UploadResult | None = None,
    error: str = "",
    status: int = 200,
) -> web.Response:
    # The limit goes to the page too: static/upload.js refuses a larger file before sending it.
    max_bytes = app_state(request).settings.max_upload_bytes
    return render(
        request,
        "upload.html",
        status=status,
        project=project,
        result=result,
        error=error,
        max_bytes=max_bytes,
    )


async def upload_form(request: web.Request) -> web.StreamResponse:
    _require(request, Action.INGEST, "upload items")
    return _upload_page(request, await _project(request))


async def _field(part: BodyPartReader | None, name: str) -> str:
    if part is None or part.name != name:
        raise Failure(403, "Not allowed", "The form was missing its security token. Reload the page.", "csrf")
    return await part.text()


async def checked_multipart(request: web.Request) -> MultipartReader:
    """A file upload's parts after its first, the CSRF token, was checked (the middleware leaves
    that to the view, so a large file is read once, as it arrives; see middleware.py), and the
    declared size was within the limit."""
    st = app_state(request)
    if request.content_length is not None and request.content_length > st.settings.max_upload_bytes:
        raise Failure(
            413,
            "File too large",
            f"Uploads are limited to {st.settings.max_upload_bytes >> 20} MiB.",
            "too_large",
        )
    reader = await request.multipart()
    first = await reader.next()
    offered = await _field(first if isinstance(first, BodyPartReader) else None, CSRF_FIELD)
    if not st.csrf.check(session_token(request), offered):
        raise Failure(403, "Not allowed", "The form's security token did not match your session.", "csrf")
    return reader


async def upload(request: web.Request) -> web.StreamResponse:
    _require(request, Action.INGEST, "upload items")
    st = app_state(request)
    reader = await checked_multipart(request)
    project = await _project(request)
    fields = {"id_field": "id", "text_field": "text"}
    part = await reader.next()
    while isinstance(part, BodyPartReader) and part.name in fields:
        fields[str(part.name)] = (await part.text()).strip() or fields[str(part.name)]
        part = await reader.next()
    if not isinstance(part, BodyPartReader) or part.name != "file" or not part.filename:
        raise bad_request("Choose a JSONL or CSV file to upload.")
    filename = part.filename

    async def submit(batch: ingest_pb2.SubmitBatchRequest) -> ingest_pb2.SubmitBatchResponse:
        response: ingest_pb2.SubmitBatchResponse = await st.backends.ingest.SubmitBatch(
            batch, **auth(request)
        )
        return response

    try:
        result = await ingest_file(
            part,
            filename=filename,
            project_id=project.project_id,
            submit=submit,
            batch_items=st.settings.upload_batch_items,
            max_bytes=st.settings.max_upload_bytes,
            id_field=fields["id_field"],
            text_field=fields["text_field"],
        )
    except UploadError as exc:
        return _upload_page(request, project, error=str(exc), status=400)
    for outcome, n in (
        ("accepted", result.accepted),
        ("duplicate", result.duplicates),
        ("rejected", result.rejected),
    ):
        UPLOADED.labels(outcome).inc(n)
    log.info(
        "upload %s into %s by %s: %d accepted, %d duplicates, %d rejected",
        filename,
        project.project_id,
        principal(request).user_id,
        result.accepted,
        result.duplicates,
        result.rejected,
    )
    return _upload_page(request, project, result=result)


# --- export ---------------------------------------------------------------------------------------


# What the export form offers: the format's name in the form → (format, extension, content type).
EXPORT_FORMATS: dict[str, tuple[export_pb2.ExportFormat.ValueType, str, str]] = {
    "jsonl": (export_pb2.EXPORT_FORMAT_JSONL, "jsonl", "application/x-ndjson; charset=utf-8"),
    "csv": (export_pb2.EXPORT_FORMAT_CSV, "csv", "text/csv; charset=utf-8"),
    "parquet": (export_pb2.EXPORT_FORMAT_PARQUET, "parquet", "application/vnd.apache.parquet"),
    "label-studio": (export_pb2.EXPORT_FORMAT_LABEL_STUDIO, "json", "application/json"),
}
_FORMAT_NAMES = {fmt: name for name, (fmt, _, _) in EXPORT_FORMATS.items()}


async def create_export(request: web.Request) -> web.StreamResponse:
    _require(request, Action.EXPORT, "export")
    project_id = request.match_info["project_id"]
    form = await request.post()
    name = str(form.get("format") or "jsonl")
    if name not in EXPORT_FORMATS:
        raise bad_request(f"Choose a format: {', '.join(EXPORT_FORMATS)}.")
    info = await app_state(request).backends.export.CreateExport(
        export_pb2.CreateExportRequest(project_id=project_id, format=EXPORT_FORMATS[name][0]), **auth(request)
    )
    raise web.HTTPSeeOther(f"/projects/{project_id}/exports/{info.export_id}")


async def _export(request: web.Request) -> export_pb2.ExportInfo:
    _require(request, Action.EXPORT, "export")
    info: export_pb2.ExportInfo = await app_state(request).backends.export.GetExport(
        export_pb2.GetExportRequest(export_id=request.match_info["export_id"]), **auth(request)
    )
    # The address names a project: an export of another one is not "here", whoever may read it.
    if info.project_id != request.match_info["project_id"]:
        raise not_found("This project has no such export.")
    return info


def _format_of(info: export_pb2.ExportInfo) -> tuple[str, str, str]:
    """(name, extension, content type) of an export's format."""
    name = _FORMAT_NAMES.get(info.format, "jsonl")
    _, extension, content_type = EXPORT_FORMATS[name]
    return name, extension, content_type


EXPORT_STATES = {
    export_pb2.EXPORT_STATE_BUILDING: "building",
    export_pb2.EXPORT_STATE_READY: "ready",
    export_pb2.EXPORT_STATE_FAILED: "failed",
}
EXPORTS_LISTED = 20


async def export_page(request: web.Request) -> web.StreamResponse:
    info = await _export(request)
    # The project's recent snapshots beside this one: versions, states and checksums.
    listed: export_pb2.ListExportsResponse = await app_state(request).backends.export.ListExports(
        export_pb2.ListExportsRequest(project_id=info.project_id, limit=EXPORTS_LISTED), **auth(request)
    )
    return render(
        request,
        "export.html",
        info=info,
        sources=sorted(info.rows_by_source.items()),
        format_name=_format_of(info)[0],
        states=EXPORT_STATES,
        exports=[(e, _FORMAT_NAMES.get(e.format, "jsonl")) for e in listed.exports],
    )


async def export_download(request: web.Request) -> web.StreamResponse:
    info = await _export(request)
    st = app_state(request)
    name, extension, content_type = _format_of(info)
    filename = f"{info.project_id}-{info.export_id}.{extension}"
    call = st.backends.export.StreamExport(
        export_pb2.StreamExportRequest(
            export_id=info.export_id, file_stem=f"{info.project_id}-{info.export_id}"
        ),
        metadata=auth(request)["metadata"],
        timeout=EXPORT_TIMEOUT_SECONDS,
    )
    # The first chunk is read before the headers go out: a refusal still gets its error page.
    iterator = call.__aiter__()
    try:
        first: export_pb2.ExportChunk | None = await iterator.__anext__()
    except StopAsyncIteration:
        first = None
    response = web.StreamResponse(
        headers={"Content-Type": content_type, "Content-Disposition": f'attachment; filename="{filename}"'}
    )
    await response.prepare(request)

    def payload(chunk: export_pb2.ExportChunk) -> bytes:
        # One file per download: the data file (a Parquet export's dataset card stays out; the
        # CLI writes it beside the data).
        if name == "jsonl":
            return chunk.jsonl
        return chunk.data if chunk.file == filename else b""

    if first is not None:
        await response.write(payload(first))
        try:
            async for chunk in iterator:
                await response.write(payload(chunk))
        except grpc.aio.AioRpcError as error:
            # The headers are gone, so no error page: the connection is cut before the final
            # chunk, which the browser reports as a failed download rather than a short file.
            log.warning("export %s stream failed after it started: %s", info.export_id, error.details())
            if request.transport is not None:
                request.transport.close()
            return response
    await response.write_eof()
    return response
