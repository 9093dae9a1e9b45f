"""The quality report as JSON and as one self-contained HTML page.

The page has no JavaScript and no external files (it is mailed and archived as one file): its
charts are drawn with matplotlib into SVG text in memory and inlined. Each chart is its own
`Figure` rendered by the SVG backend, never through pyplot, whose global current-figure state is
not safe in the export service's report threads.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any

import matplotlib
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from services.export.report import (
    LabelErrorCandidate,
    LabelErrorCounts,
    QualityReport,
    Rate,
    SliceReport,
)

# Without a salt the SVG backend makes ids from random UUIDs, so the same report would differ byte
# for byte between runs. Set once at import, never toggled (rc_context would race other threads).
if matplotlib.rcParams["svg.hashsalt"] is None:
    matplotlib.rcParams["svg.hashsalt"] = "tandem-quality-report"

OTHER_LABEL = "other"
TOP_LABELS = 9  # labels drawn on their own in the distribution chart; the rest are "other"
MAX_CHART_ROWS = 40  # slice values per chart (the largest); the tables keep them all
CANDIDATES_SHOWN = 100
_BLUE, _RED, _TARGET, _GREY = "#2e86c1", "#c0392b", "#e67e22", "#bbbbbb"


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


def _utc(unix_ms: int) -> str:
    return datetime.fromtimestamp(unix_ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")


def _flags(s: SliceReport) -> str:
    names = [n for n, on in (("accuracy below target", s.accuracy_below_target),
                             ("distribution drift", s.distribution_drift)) if on]  # fmt: skip
    if s.audit_raised_since_unix_ms:
        names.append(f"audit share raised since {_utc(s.audit_raised_since_unix_ms)}")
    return ", ".join(names)


def _label_errors(c: LabelErrorCounts) -> str:
    if not c.candidates:
        return "–"
    return f"{c.candidates} (corrected {c.corrected}, kept {c.kept}, other {c.other})"


_HEAD = (
    "value",
    "items",
    "labels",
    "auto-accepted",
    "human",
    "audit share",
    "audited accuracy [95% CI]",
    "model–people agreement [95% CI]",
    "people agreement (pairs)",
    "drift TV",
    "drift p",
    "label-error reviews",
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
        _pct(s.audit_share),
        _rate(s.audited_accuracy),
        _rate(s.model_agreement),
        f"{_pct(pa.share)} ({pa.pairs})",
        f"{s.drift_distance:.3f}",
        "–" if s.drift_p is None else f"{s.drift_p:.2g}",
        _label_errors(s.label_errors),
        _flags(s),
    )
    classes = " ".join(c for c, on in (("reference", reference), ("flagged", s.flagged)) if on)
    cls = f' class="{classes}"' if classes else ""
    return f"<tr{cls}>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>"


def _svg(fig: Figure) -> str:
    """The figure as inline SVG: the XML prolog and DOCTYPE are not allowed inside HTML."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _charted(rows: Sequence[SliceReport]) -> tuple[list[SliceReport], str]:
    """The slice values a chart shows (the largest when there are many, in the tables' order) and
    a note saying so."""
    if len(rows) <= MAX_CHART_ROWS:
        return list(rows), ""
    keep = {id(s) for s in sorted(rows, key=lambda s: -s.items)[:MAX_CHART_ROWS]}
    return [s for s in rows if id(s) in keep], f"the {MAX_CHART_ROWS} largest of {len(rows)} values shown"


def _short(text: str, limit: int = 32) -> str:
    # A long slice value or label would squeeze the plot to nothing; the tables keep it whole.
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _mark(ax: Axes, flagged: Sequence[bool]) -> None:
    """Flagged slices' names in red, bold: the colour alone would not survive a grey print."""
    for tick, on in zip(ax.get_yticklabels(), flagged, strict=True):
        if on:
            tick.set_color(_RED)
            tick.set_fontweight("bold")


def accuracy_chart(rows: Sequence[SliceReport], target: float) -> str:
    """Audited accuracy per slice value as a point with its 95% interval as error bars, the target
    as a dashed line; slices flagged below target in red; a slice without audits says so."""
    shown, note = _charted(rows)
    fig = Figure(figsize=(7.0, 0.9 + 0.32 * max(len(shown), 1)))
    ax = fig.add_subplot()
    ys = list(range(len(shown)))[::-1]  # the first value on top, as in the table
    for y, s in zip(ys, shown, strict=True):
        r = s.audited_accuracy
        if r.estimate is None:
            ax.text(0.01, y, "no audits", va="center", fontsize=8, color="#777777")
            continue
        color = _RED if s.accuracy_below_target else _BLUE
        ax.errorbar(
            [r.estimate],
            [y],
            # Rounding can put an end a hair past the estimate at 0% or 100%; matplotlib refuses that.
            xerr=[[max(0.0, r.estimate - r.low)], [max(0.0, r.high - r.estimate)]],
            fmt="o",
            color=color,
            ecolor=color,
            capsize=3,
            markersize=5,
        )
    ax.axvline(target, color=_TARGET, linestyle="--", linewidth=1.5, label=f"target {target:.0%}")
    ax.set_xlim(0.0, 1.02)  # room for a marker at 100%
    ax.set_ylim(-0.7, len(shown) - 0.3)
    ax.set_yticks(ys, [_short(s.value) for s in shown], fontsize=8)
    _mark(ax, [s.accuracy_below_target for s in shown])
    ax.xaxis.set_major_formatter(lambda x, _pos: f"{x:.0%}")
    ax.set_xlabel("audited accuracy of automatic labels, 95% interval" + (f" ({note})" if note else ""))
    ax.grid(axis="x", color="#eeeeee")
    ax.legend(loc="lower left", fontsize=8, frameon=False)
    return _svg(fig)


def label_series(
    rows: Sequence[SliceReport], whole: Mapping[str, int], top: int = TOP_LABELS
) -> tuple[list[str], list[list[float]]]:
    """The labels the distribution chart draws (the whole's `top` most frequent, then "other" for
    the rest when there are more) and, per row, each one's share of the row's items."""
    ranked = sorted(whole, key=lambda k: (-whole[k], k))
    named = ranked if len(ranked) <= top + 1 else ranked[:top]  # "other" never stands for one label
    labels = named + ([OTHER_LABEL] if len(named) < len(ranked) else [])
    shares = []
    for s in rows:
        n = sum(s.labels.values())
        parts = [s.labels.get(k, 0) / n if n else 0.0 for k in named]
        if len(labels) > len(named):
            parts.append(1.0 - sum(parts) if n else 0.0)
        shares.append(parts)
    return labels, shares


def distribution_chart(rows: Sequence[SliceReport], overall: SliceReport) -> str:
    """The final-label distribution of each slice value as a stacked bar, the whole on top."""
    shown, note = _charted(rows)
    bars = [overall, *shown]
    labels, shares = label_series(bars, overall.labels)
    fig = Figure(figsize=(7.0, 1.2 + 0.32 * len(bars)))
    ax = fig.add_subplot()
    ys = list(range(len(bars)))[::-1]
    names = ["whole project" if s is overall else _short(s.value) for s in bars]
    # tab10 holds TOP_LABELS colours, and "other" is grey. Asked of the counts, not the name: a
    # project may have a label called "other".
    colors = [colormaps["tab10"](i % 10) for i in range(len(labels))]
    if len(overall.labels) > TOP_LABELS + 1:
        colors[-1] = to_rgba(_GREY)
    left = [0.0] * len(bars)
    for i, (label, color) in enumerate(zip(labels, colors, strict=True)):
        width = [row[i] for row in shares]
        ax.barh(
            ys,
            width,
            left=left,
            color=color,
            label=_short(label),
            height=0.7,
            edgecolor="white",
            linewidth=0.5,
        )
        left = [a + b for a, b in zip(left, width, strict=True)]
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(-0.5, len(bars) - 0.5)
    ax.set_yticks(ys, names, fontsize=8)
    _mark(ax, [s.distribution_drift for s in bars])
    ax.xaxis.set_major_formatter(lambda x, _pos: f"{x:.0%}")
    ax.set_xlabel("share of items by final label" + (f" ({note})" if note else ""))
    if labels:  # an empty legend is a warning, and the tests turn warnings into errors
        ax.legend(loc="upper left", bbox_to_anchor=(1.04, 1.0), fontsize=8, frameon=False)
    return _svg(fig)


_CANDIDATE_HEAD = ("id", "item", "text", "given", "model (confidence)", "second look", "final", "outcome")


def _candidate(c: LabelErrorCandidate) -> str:
    cells = (
        c.id,
        c.item_id,
        c.text,
        c.given_label,
        f"{c.model_label} ({c.model_confidence:.2f})",
        c.second_label,
        c.final_label,
        c.outcome,
    )
    return f'<tr class="{escape(c.outcome)}">' + "".join(f"<td>{escape(x)}</td>" for x in cells) + "</tr>"


def _label_error_section(report: QualityReport) -> list[str]:
    c = report.label_errors
    listed = report.label_error_candidates[:CANDIDATES_SHOWN]
    out = [
        "<h2>Label-error review</h2>",
        '<p class="note">Items whose human label the model contradicted with confidence went to a '
        "second person. <b>corrected</b>: the final label is the model's, not the one first given; "
        "<b>kept</b>: the final label is the one first given; <b>other</b>: neither.</p>",
        f"<p>Reviewed {c.candidates:,}: corrected {c.corrected:,}, kept {c.kept:,}, other {c.other:,}.</p>",
    ]
    if listed:
        if c.candidates > len(listed):
            out.append(f'<p class="note">The first {len(listed)} of {c.candidates:,} are listed.</p>')
        head = "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in _CANDIDATE_HEAD) + "</tr>"
        out.append(f"<table>{head}{''.join(_candidate(x) for x in listed)}</table>")
    return out


_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
    "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
    "th{background:#f3f3f3}tr.flagged td{background:#fdecea}tr.reference td{font-weight:600}"
    "tr.corrected td{background:#eaf5ea}"
    ".note{color:#555;font-size:13px;max-width:60em}svg{max-width:100%;height:auto}"
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
        "the whole's and a chi-square test against the other rows gives p &lt; 0.01. The audit share is "
        "the items audited among those and the items accepted automatically.</p>",
        "<h2>Whole project</h2>",
        f"<table>{head}{reference}</table>",
    ]
    for name in report.slice_fields:
        rows = report.by_field(name)
        body.append(f"<h2>Slice: {escape(name)}</h2>")
        body.append(f"<table>{head}{''.join(_row(s) for s in rows)}</table>")
        body.append(f"<h3>Audited accuracy by {escape(name)}</h3>")
        body.append(accuracy_chart(rows, report.target_accuracy))
        body.append(f"<h3>Label distribution by {escape(name)}</h3>")
        body.append(distribution_chart(rows, report.overall))
    body += _label_error_section(report)
    body.append("</body></html>")
    return "\n".join(body) + "\n"
