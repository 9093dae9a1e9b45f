"""`tandem bench aggregation`: majority vote vs Dawid–Skene on a crowd with every raw judgment.

Offline (the default): the file has, per item, a reference `label` and every annotator's raw
label. For each overlap k and repeat r, every item keeps k of its raw judgments drawn at random
(seeded by seed + r), as if the project had asked k people; both methods aggregate those, and
each is scored against the reference. The reference never enters the aggregation. On the
weather-sentiment crowd the reference is the platform's aggregate of all 20 judgments, so the
question is which method gets closer to "what 20 people would say" from only k of them.

`--simulate` is to run a simulated heterogeneous workforce on the real services instead
(docs/workforce.md); it is not built yet.
"""

from __future__ import annotations

import json
import random
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from services.cli.bench_labeling import dataset_name
from services.cli.commands import console
from services.cli.files import InputError
from services.review.aggregation import Judgment, fit_dawid_skene, majority_vote

GOAL_OVERLAPS = (3, 5)


@dataclass(frozen=True)
class AggregationBenchOptions:
    data: Path | None
    overlaps: tuple[int, ...] = (3, 5)
    repeat: int = 10
    seed: int = 0


@dataclass(frozen=True)
class CrowdItem:
    item_id: str
    label: str  # the reference the methods are scored against
    judgments: tuple[tuple[str, str], ...]  # (annotator_id, label), sorted by annotator


@dataclass(frozen=True)
class AggregationRow:
    overlap: int
    items: int
    repeats: int
    majority_vote_mean: float
    majority_vote_std: float
    dawid_skene_mean: float
    dawid_skene_std: float
    dawid_skene_wins: int  # repeats where Dawid–Skene was strictly more accurate

    @property
    def difference(self) -> float:
        return self.dawid_skene_mean - self.majority_vote_mean


def parse_overlaps(text: str) -> tuple[int, ...]:
    try:
        overlaps = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise InputError(f"--overlap: expected comma-separated whole numbers, got {text!r}") from exc
    if not overlaps or min(overlaps) < 1:
        raise InputError(f"--overlap: expected numbers of judgments per item (1 or more), got {text!r}")
    return overlaps


def load_crowd(path: Path) -> list[CrowdItem]:
    """JSONL rows with `label` and `annotator_labels` ({annotator_id: label}); `id` if present."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    items: list[CrowdItem] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{path}:{lineno}: not valid JSON: {exc}") from exc
        label = row.get("label") if isinstance(row, dict) else None
        raw = row.get("annotator_labels") if isinstance(row, dict) else None
        if (
            not isinstance(label, str)
            or not label
            or not isinstance(raw, dict)
            or not raw
            or not all(isinstance(v, str) and v for v in raw.values())
        ):
            raise InputError(
                f"{path}:{lineno}: each line needs 'label' (a string) and 'annotator_labels' "
                "({annotator_id: label}, not empty)"
            )
        item_id = str(row.get("id") or f"line-{lineno}")
        items.append(CrowdItem(item_id, label, tuple(sorted((str(a), v) for a, v in raw.items()))))
    if not items:
        raise InputError(f"{path}: no items")
    return items


def sample_judgments(items: Sequence[CrowdItem], k: int, rng: random.Random) -> list[Judgment]:
    """k raw judgments of every item (all of them where it has fewer)."""
    judgments: list[Judgment] = []
    for item in items:
        chosen = rng.sample(item.judgments, min(k, len(item.judgments)))
        judgments.extend(Judgment(item.item_id, a, lb) for a, lb in chosen)
    return judgments


def label_order(judgments: Sequence[Judgment], labels: set[str]) -> list[str]:
    """Labels by how often the sampled judgments chose them, then by name. Majority vote breaks a
    tie by this order: the strongest fixed rule that needs no reference labels, so the baseline
    is not handicapped by an arbitrary one (alphabetical would favour the rare "I can't tell")."""
    counts = Counter(j.label for j in judgments)
    return sorted(labels, key=lambda lb: (-counts[lb], lb))


def run_offline(options: AggregationBenchOptions) -> list[AggregationRow]:
    if options.data is None:
        raise InputError("--data is needed (JSONL with 'label' and 'annotator_labels')")
    if options.repeat < 1:
        raise InputError(f"--repeat must be at least 1, got {options.repeat}")
    items = load_crowd(options.data)
    reference = {item.item_id: item.label for item in items}
    if len(reference) != len(items):
        raise InputError(f"{options.data}: item ids repeat; each line must be a different item")
    all_labels = {item.label for item in items} | {lb for item in items for _, lb in item.judgments}
    if len(all_labels) < 2:
        raise InputError(f"{options.data}: only one label in the file; nothing to aggregate")

    rows: list[AggregationRow] = []
    for k in options.overlaps:
        mv_scores: list[float] = []
        ds_scores: list[float] = []
        for r in range(options.repeat):
            judgments = sample_judgments(items, k, random.Random(options.seed + r))
            labels = label_order(judgments, all_labels)
            mv = majority_vote(judgments, labels)
            ds = fit_dawid_skene(judgments, labels).aggregates()
            mv_scores.append(sum(mv[i].label == lb for i, lb in reference.items()) / len(reference))
            ds_scores.append(sum(ds[i].label == lb for i, lb in reference.items()) / len(reference))
        rows.append(
            AggregationRow(
                overlap=k,
                items=len(items),
                repeats=options.repeat,
                majority_vote_mean=statistics.fmean(mv_scores),
                majority_vote_std=_std(mv_scores),
                dawid_skene_mean=statistics.fmean(ds_scores),
                dawid_skene_std=_std(ds_scores),
                dawid_skene_wins=sum(d > m for d, m in zip(ds_scores, mv_scores, strict=True)),
            )
        )
    return rows


def results_table(rows: Sequence[AggregationRow], title: str, caption: str = "") -> Table:
    table = Table(title=title, caption=caption or None, header_style="bold")
    for col in ("k", "majority vote", "Dawid–Skene", "difference", "DS wins", "items"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r.overlap),
            f"{r.majority_vote_mean:.4f} ± {r.majority_vote_std:.4f}",
            f"{r.dawid_skene_mean:.4f} ± {r.dawid_skene_std:.4f}",
            f"{r.difference:+.4f}",
            f"{r.dawid_skene_wins}/{r.repeats}",
            f"{r.items:,}",
        )
    return table


def goal_line(rows: Sequence[AggregationRow]) -> str:
    """Whether Dawid–Skene is at least as accurate as majority vote at k=3 and k=5."""
    by_k = {r.overlap: r for r in rows}
    goal = "goal: Dawid–Skene ≥ majority vote at " + " and ".join(f"k={k}" for k in GOAL_OVERLAPS)
    missing = [k for k in GOAL_OVERLAPS if k not in by_k]
    if missing:
        return f"{goal}: not measured (run with --overlap {','.join(map(str, GOAL_OVERLAPS))})"
    met = all(by_k[k].difference >= 0 for k in GOAL_OVERLAPS)
    return f"{goal}: {'[green]met[/]' if met else '[red]not met[/]'}"


def run_aggregation_bench(options: AggregationBenchOptions) -> int:
    with console.status("aggregating…"):
        rows = run_offline(options)
    assert options.data is not None  # run_offline refuses None
    caption = f"accuracy against each item's 'label', mean ± std over {options.repeat} draws"
    table = results_table(rows, f"tandem bench aggregation: {dataset_name(options.data)}", caption)
    console.print(table)
    console.print(goal_line(rows))
    return 0


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0
