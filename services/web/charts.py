"""Geometry of the status page's two small charts, drawn as inline SVG by the templates.

No chart library and no script: the page is re-rendered on every refresh anyway, and an inline
`<svg>` needs nothing the Content-Security-Policy forbids (styles come from app.css via classes).
Here are only coordinates and tick labels; `_charts.html` draws them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from services.gen.tandem.stats.v1 import stats_pb2
from services.web.throughput import Rate, Sample, rates

WIDTH = 720
# (span, time between x ticks), in seconds: the smallest span that holds what was sampled.
SPANS = (
    (60, 15),
    (120, 30),
    (300, 60),
    (600, 120),
    (900, 300),
    (1800, 300),
    (3600, 600),
    (7200, 1200),
)


@dataclass(frozen=True)
class Tick:
    at: float  # x or y in the SVG's coordinates
    label: str


@dataclass(frozen=True)
class Series:
    kind: str  # the CSS class: "final" or "human"
    points: str  # an SVG polyline's points
    last: tuple[float, float]


@dataclass(frozen=True)
class Plot:
    """The drawing area inside the axes."""

    left: float
    top: float
    right: float
    bottom: float


@dataclass(frozen=True)
class ThroughputChart:
    width: int
    height: int
    plot: Plot
    series: list[Series]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    latest: Rate
    seconds: int  # the time axis' span


def nice_step(raw: float) -> float:
    """The smallest of 1, 2, 5 × 10^k that is at least `raw`."""
    if raw <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(raw))
    for factor in (1.0, 2.0, 5.0, 10.0):
        if factor * power >= raw * (1 - 1e-9):
            return factor * power
    return 10.0 * power


def _number(value: float) -> str:
    return f"{value:.0f}" if value == int(value) else f"{value:g}"


def _ago(seconds: int) -> str:
    if seconds == 0:
        return "now"
    return f"−{seconds // 60} min" if seconds % 60 == 0 else f"−{seconds} s"


def throughput_chart(samples: Sequence[Sample]) -> ThroughputChart | None:
    """Final and human labels per minute over the sampled stretch; None until there is a rate."""
    segments = rates(samples)
    if not segments:
        return None
    end = samples[-1].at
    sampled = end - samples[0].at
    span, every = next(((s, e) for s, e in SPANS if s >= sampled), SPANS[-1])
    height = 210
    plot = Plot(left=44.0, top=10.0, right=WIDTH - 14.0, bottom=height - 28.0)
    highest = max(max(r.final_per_minute, r.human_per_minute) for seg in segments for r in seg)
    step = nice_step(max(highest, 1.0) / 4)
    top = step * max(math.ceil(highest / step - 1e-9), 1)

    def x(at: float) -> float:
        return plot.left + (at - (end - span)) / span * (plot.right - plot.left)

    def y(value: float) -> float:
        return plot.bottom - value / top * (plot.bottom - plot.top)

    series = []
    for kind in ("final", "human"):
        for seg in segments:
            coords = [(round(x(r.at), 1), round(y(getattr(r, f"{kind}_per_minute")), 1)) for r in seg]
            points = " ".join(f"{cx},{cy}" for cx, cy in coords)
            series.append(Series(kind, points, coords[-1]))
    x_ticks = [Tick(round(x(end - ago), 1), _ago(ago)) for ago in range(0, span + 1, every)]
    y_ticks = [Tick(round(y(i * step), 1), _number(round(i * step, 6))) for i in range(round(top / step) + 1)]
    return ThroughputChart(
        width=WIDTH,
        height=height,
        plot=plot,
        series=series,
        x_ticks=x_ticks,
        y_ticks=y_ticks,
        latest=segments[-1][-1],
        seconds=span,
    )


# --- accuracy -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    label: str
    kind: str  # the CSS class: "estimated" or "audited"
    point: float  # x of the point estimate
    low: float | None  # x of the interval's ends, None without one
    high: float | None


@dataclass(frozen=True)
class AccuracyChart:
    width: int
    height: int
    plot: Plot
    rows: list[tuple[float, Interval]]  # (y of the row's middle, row)
    target: float | None  # x of the target line
    x_ticks: list[Tick]


def accuracy_chart(scorer: stats_pb2.ScorerStats, target_accuracy: float) -> AccuracyChart | None:
    """The estimated accuracy with its certified lower bound (the certificate is one-sided: at
    least this, with probability 1 − δ), and the audited accuracy of the automatic labels with its
    95% Wilson interval, on one percentage scale with the target. None before any of them exists."""
    parts: list[tuple[str, str, float, float | None, float | None]] = []
    if scorer.estimated_accuracy:
        low = scorer.certified_accuracy or None
        parts.append(
            ("Estimated (certified bound)", "estimated", scorer.estimated_accuracy, low, 1.0 if low else None)
        )
    if scorer.audited:
        parts.append(
            (
                "Audited (95% interval)",
                "audited",
                scorer.audit_accuracy,
                scorer.audit_accuracy_low,
                scorer.audit_accuracy_high,
            )
        )
    if not parts:
        return None
    values = [v for _, _, point, low, _ in parts for v in (point, low) if v is not None]
    if target_accuracy:
        values.append(target_accuracy)
    lowest = min(max(0.0, min(values) - 0.01), 0.9)
    every = 0.05 if 1 - lowest <= 0.3 else 0.1 if 1 - lowest <= 0.6 else 0.2
    lowest = math.floor(round(lowest / every, 6)) * every
    row_height = 30.0
    plot = Plot(left=200.0, top=22.0, right=WIDTH - 20.0, bottom=22.0 + row_height * len(parts))
    height = int(plot.bottom + 24)

    def x(value: float) -> float:
        return round(plot.left + (value - lowest) / (1 - lowest) * (plot.right - plot.left), 1)

    rows = [
        (
            plot.top + row_height * (i + 0.5),
            Interval(
                label,
                kind,
                x(point),
                x(low) if low is not None else None,
                x(high) if high is not None else None,
            ),
        )
        for i, (label, kind, point, low, high) in enumerate(parts)
    ]
    ticks = []
    value = lowest
    while value <= 1.0 + 1e-9:
        ticks.append(Tick(x(value), f"{100 * value:.0f}%"))
        value = round(value + every, 6)
    return AccuracyChart(
        width=WIDTH,
        height=height,
        plot=plot,
        rows=rows,
        target=x(target_accuracy) if target_accuracy else None,
        x_ticks=ticks,
    )
