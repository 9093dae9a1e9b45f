"""The quality and fairness report in the web app (`/projects/{p}/quality`).

The export service makes the report (ReportService.GetReport, on a fresh snapshot) with the
person's own token; the page shows its flags and embeds the report's own self-contained page in a
sandboxed frame, and offers it as a file. Making a report publishes the slices it flags (the scorer
audits them more), so it is a POST, never a GET.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from services.common.auth import Action
from services.gen.tandem.export.v1 import export_pb2
from services.web.errors import bad_request
from services.web.middleware import CSP
from services.web.state import app_state, auth, render
from services.web.views.manage import _project, _require

MAX_FIELDS = 10
# The report reads a fresh snapshot of the project: longer than an ordinary call may take.
REPORT_TIMEOUT_S = 600.0


def slice_fields(text: str) -> list[str]:
    """Comma- or space-separated metadata field names, each once, in the order given."""
    return list(dict.fromkeys(f for f in text.replace(",", " ").split() if f))


def _since(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M UTC") if ms else ""


async def quality_page(request: web.Request) -> web.StreamResponse:
    _require(request, Action.EXPORT, "make quality reports")
    project = await _project(request)
    fields = request.query.get("slice", "") or ", ".join(project.skill_fields)
    return render(request, "quality.html", project=project, fields=fields, report=None, error="")


async def make_report(request: web.Request) -> web.StreamResponse:
    _require(request, Action.EXPORT, "make quality reports")
    project = await _project(request)
    posted = await request.post()
    text = str(posted.get("slice", ""))
    fields = slice_fields(text)
    if not fields or len(fields) > MAX_FIELDS:
        return render(
            request,
            "quality.html",
            status=400,
            project=project,
            fields=text,
            report=None,
            error=f"Name 1 to {MAX_FIELDS} metadata fields of the items to slice by, e.g. domain, region.",
        )
    call = {**auth(request), "timeout": REPORT_TIMEOUT_S}
    report: export_pb2.Report = await app_state(request).backends.report.GetReport(
        export_pb2.GetReportRequest(project_id=project.project_id, slice_fields=fields, html=True), **call
    )
    if posted.get("download"):
        name = f"{project.project_id}-quality-{report.export_id}.html"
        return web.Response(
            body=report.html.encode(),
            content_type="text/html",
            charset="utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )
    doc: dict[str, Any] = json.loads(report.json)
    if not doc.get("slices") and doc.get("overall", {}).get("items", 0) == 0:
        raise bad_request("The project has no final labels to report on yet.")
    rows = [
        {**s, "raised": _since(int(s.get("audit_raised_since_unix_ms") or 0))}
        for s in doc["slices"]
        if s["flagged"]
    ]
    response = render(
        request,
        "quality.html",
        project=project,
        fields=", ".join(fields),
        report=report,
        doc=doc,
        flagged=rows,
        error="",
    )
    # The report's page (in a sandboxed frame, which inherits this policy) styles itself inline,
    # its charts included; scripts stay forbidden, and it has none.
    response.headers["Content-Security-Policy"] = CSP.replace(
        "style-src 'self'", "style-src 'self' 'unsafe-inline'"
    )
    return response
