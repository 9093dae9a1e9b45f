"""`tandem report`: the quality and fairness report of a project, computed from a fresh export."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from services.cli.client import Clients
from services.cli.commands import export_files
from services.export.report import QualityReport, Rate, SliceReport, build_report
from services.export.report_html import to_dict, to_html

REPORT_FORMATS = ("html", "json")


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def _build(path: Path, slices: Sequence[str], target: float, project_id: str) -> QualityReport:
    return build_report(_lines(path), slices, target, project_id)


async def quality_report(
    clients: Clients,
    project_id: str,
    slices: Sequence[str],
    fmt: str = "html",
    out: Path | None = None,
    target: float | None = None,
) -> tuple[QualityReport, Path]:
    """Export the project as JSONL into a temporary folder (the same stream and checks as
    `tandem export`), build the report from it line by line, and write it as HTML or JSON."""
    if target is None:
        target = (await clients.stats(project_id)).scorer.target_accuracy
    with tempfile.TemporaryDirectory(prefix="tandem-report-") as tmp:
        _, paths = await export_files(clients, project_id, Path(tmp) / "export.jsonl", "jsonl")
        report = await asyncio.to_thread(_build, paths[0], slices, target, project_id)
    text = to_html(report) if fmt == "html" else json.dumps(to_dict(report), indent=2) + "\n"
    path = out or Path("reports") / f"{project_id}-quality-{time.strftime('%Y%m%d-%H%M%S')}.{fmt}"
    path.parent.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(path.write_text, text, encoding="utf-8")
    return report, path


def _short(r: Rate) -> str:
    if r.estimate is None:
        return "–"
    return f"{r.estimate:.3f} [{r.low:.3f}, {r.high:.3f}] n={r.n}"


def flags_table(report: QualityReport) -> Table:
    table = Table(title=f"quality by slice (target {report.target_accuracy:.2f})")
    for col in ("slice", "value", "items", "audited accuracy", "model–people", "drift TV", "flags"):
        table.add_column(col)

    def add(s: SliceReport) -> None:
        flags = [
            n for n, on in (("accuracy", s.accuracy_below_target), ("drift", s.distribution_drift)) if on
        ]
        table.add_row(
            s.field or "(all)",
            s.value,
            f"{s.items:,}",
            _short(s.audited_accuracy),
            _short(s.model_agreement),
            f"{s.drift_distance:.3f}",
            f"[bold red]{', '.join(flags)}[/]" if flags else "",
        )

    add(report.overall)
    for s in report.slices:
        add(s)
    return table
