"""`tandem report`: the quality and fairness report of a project (or of one of its exports), made
by the export service, written as HTML or JSON, its flags printed."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from services.cli.client import Clients
from services.gen.tandem.export.v1 import export_pb2

REPORT_FORMATS = ("html", "json")
# A fresh snapshot of a large project is part of the call.
REPORT_TIMEOUT_S = 1800.0


async def quality_report(
    clients: Clients,
    project_id: str,
    slices: Sequence[str],
    fmt: str = "html",
    out: Path | None = None,
    export_id: str = "",
) -> tuple[dict[str, Any], Path]:
    """Ask for the report (on a fresh snapshot unless `export_id` names one) and write it. The
    slices it flags are audited more by the scorer from then on."""
    report = await clients.report.GetReport(
        export_pb2.GetReportRequest(
            project_id=project_id, export_id=export_id, slice_fields=list(slices), html=fmt == "html"
        ),
        timeout=REPORT_TIMEOUT_S,
    )
    doc: dict[str, Any] = json.loads(report.json)
    doc["export_id"] = report.export_id
    text = report.html if fmt == "html" else json.dumps(doc, indent=2) + "\n"
    path = out or Path("reports") / f"{project_id}-quality-{time.strftime('%Y%m%d-%H%M%S')}.{fmt}"
    path.parent.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(path.write_text, text, encoding="utf-8")
    return doc, path


def _short(r: dict[str, Any]) -> str:
    if r.get("estimate") is None:
        return "–"
    return f"{r['estimate']:.3f} [{r['low']:.3f}, {r['high']:.3f}] n={r['n']}"


def _share(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def flags_table(doc: dict[str, Any]) -> Table:
    """The report's rows, flagged ones in red, with whether the scorer audits them more."""
    table = Table(title=f"quality by slice (target {doc['target_accuracy']:.2f})")
    for col in (
        "slice",
        "value",
        "items",
        "audited accuracy",
        "model–people",
        "audit share",
        "drift TV",
        "flags",
    ):
        table.add_column(col)

    def add(s: dict[str, Any]) -> None:
        flags = [
            n for n, key in (("accuracy", "accuracy_below_target"), ("drift", "distribution_drift")) if s[key]
        ]
        if s.get("audit_raised_since_unix_ms"):
            flags.append("audits raised")
        table.add_row(
            s["field"] or "(all)",
            s["value"],
            f"{s['items']:,}",
            _short(s["audited_accuracy"]),
            _short(s["model_agreement"]),
            _share(s.get("audit_share")),
            f"{s['drift_distance']:.3f}",
            f"[bold red]{', '.join(flags)}[/]" if flags else "",
        )

    add(doc["overall"])
    for s in doc["slices"]:
        add(s)
    return table
