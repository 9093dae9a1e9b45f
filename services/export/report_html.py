"""The quality report as JSON and as one self-contained HTML page.

The page has no JavaScript and no external files (it is mailed and archived as one file), and its
charts are SVG drawn here: no plotting library is a dependency of the project.
"""

from __future__ import annotations

import dataclasses
from html import escape
from typing import Any

from services.export.report import QualityReport, Rate, SliceReport


def to_dict(report: QualityReport) -> dict[str, Any]:
    doc = dataclasses.asdict(report)
    # `flagged` is a property, which asdict leaves out; readers of the JSON want it per row.
    doc["overall"]["flagged"] = report.overall.flagged
    for row, s in zip(doc["slices"], report.slices, strict=True):
        row["flagged"] = s.flagged
    return doc


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _rate(r: Rate) -> str:
    if r.n == 0:
        return "– (n=0)"
    return f"{_pct(r.estimate)} [{_pct(r.low)}, {_pct(r.high)}] (n={r.n})"


def _flags(s: SliceReport) -> str:
    names = [n for n, on in (("accuracy below target", s.accuracy_below_target),
                             ("distribution drift", s.distribution_drift)) if on]  # fmt: skip
    return ", ".join(names)


_HEAD = (
    "value",
    "items",
    "labels",
    "auto-accepted",
    "human",
    "audited accuracy [95% CI]",
    "model–people agreement [95% CI]",
    "people agreement (pairs)",
    "drift TV",
    "drift p",
    "flags",
)


def _row(s: SliceReport, *, reference: bool = False) -> str:
    pa = s.people_agreement
    cells = (
        s.value,
        f"{s.items:,}",
        ", ".join(f"{k}: {v}" for k, v in s.labels.items()),
        _pct(s.auto_share),
        _pct(s.human_share),
        _rate(s.audited_accuracy),
        _rate(s.model_agreement),
        f"{_pct(pa.share)} ({pa.pairs})",
        f"{s.drift_distance:.3f}",
        "–" if s.drift_p is None else f"{s.drift_p:.2g}",
        _flags(s),
    )
    classes = " ".join(c for c, on in (("reference", reference), ("flagged", s.flagged)) if on)
    cls = f' class="{classes}"' if classes else ""
    return f"<tr{cls}>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>"


def _chart(rows: list[SliceReport], target: float) -> str:
    """Horizontal bars of audited accuracy with the interval as a whisker and the target as a
    dashed line; a slice without audits shows no bar, only its name and "no audits"."""
    label_w, plot_w, bar_h, gap = 160, 360, 16, 8
    height = len(rows) * (bar_h + gap) + 30
    x0 = label_w

    def x(v: float) -> float:
        return x0 + v * plot_w

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + plot_w + 20}" height="{height}"'
        ' role="img" aria-label="audited accuracy per slice">'
    ]
    for i, s in enumerate(rows):
        y = 10 + i * (bar_h + gap)
        parts.append(
            f'<text x="{x0 - 6}" y="{y + bar_h - 4}" text-anchor="end" font-size="12">{escape(s.value)}</text>'
        )
        r = s.audited_accuracy
        if r.estimate is None:
            parts.append(
                f'<text x="{x0 + 4}" y="{y + bar_h - 4}" font-size="11" fill="#777">no audits</text>'
            )
            continue
        color = "#c0392b" if s.accuracy_below_target else "#2e86c1"
        parts.append(
            f'<rect x="{x0}" y="{y}" width="{r.estimate * plot_w:.1f}" height="{bar_h}" fill="{color}">'
            f"<title>{escape(_rate(r))}</title></rect>"
        )
        mid = y + bar_h / 2
        parts.append(
            f'<line x1="{x(r.low):.1f}" y1="{mid}" x2="{x(r.high):.1f}" y2="{mid}" stroke="#000" stroke-width="1.5"/>'
        )
        for end in (r.low, r.high):
            parts.append(
                f'<line x1="{x(end):.1f}" y1="{y + 3}" x2="{x(end):.1f}" y2="{y + bar_h - 3}" stroke="#000"/>'
            )
    axis_y = height - 18
    parts.append(f'<line x1="{x0}" y1="{axis_y}" x2="{x(1.0)}" y2="{axis_y}" stroke="#999"/>')
    for tick in (0.0, 0.5, 1.0):
        parts.append(
            f'<text x="{x(tick):.1f}" y="{axis_y + 13}" text-anchor="middle" font-size="10">{tick:.0%}</text>'
        )
    parts.append(
        f'<line x1="{x(target):.1f}" y1="4" x2="{x(target):.1f}" y2="{axis_y}" stroke="#e67e22"'
        ' stroke-dasharray="4 3" stroke-width="2"><title>target</title></line>'
    )
    parts.append("</svg>")
    return "".join(parts)


_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
    "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
    "th{background:#f3f3f3}tr.flagged td{background:#fdecea}tr.reference td{font-weight:600}"
    ".note{color:#555;font-size:13px;max-width:60em}"
)


def to_html(report: QualityReport) -> str:
    title = f"Quality and fairness report — {report.project_id or 'project'}"
    head = "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in _HEAD) + "</tr>"
    reference = _row(report.overall, reference=True)
    body = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="note">Target accuracy {_pct(report.target_accuracy)}. Intervals are 95% Wilson intervals. '
        "A slice is flagged <b>accuracy below target</b> when its audited-accuracy interval lies wholly "
        "below the target (without audits: its model–people agreement interval), and "
        "<b>distribution drift</b> when its label distribution is more than 0.1 (total variation) from "
        "the whole's and a chi-square test against the other rows gives p &lt; 0.01.</p>",
        "<h2>Whole project</h2>",
        f"<table>{head}{reference}</table>",
    ]
    for name in report.slice_fields:
        rows = report.by_field(name)
        body.append(f"<h2>Slice: {escape(name)}</h2>")
        body.append(f"<table>{head}{''.join(_row(s) for s in rows)}</table>")
        body.append(f"<h3>Audited accuracy by {escape(name)}</h3>")
        body.append(_chart(rows, report.target_accuracy))
    body.append("</body></html>")
    return "\n".join(body) + "\n"
