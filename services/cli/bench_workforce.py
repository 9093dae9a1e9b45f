"""`tandem bench aggregation --simulate`: a heterogeneous simulated workforce on the real services.

A pool of labeled items goes to people only (the project's random-review arm at 100%, so every
item is labeled by people and aggregation is what is measured), with overlap k, gold questions
held out from the same dataset, and a workforce of careful people, careless ones and a spammer
who answers at random. At the end the export's raw labels are aggregated again offline by
majority vote and by Dawid-Skene (the same code the review service uses), and compared with the
final labels the service produced as it went. Also printed: how many tasks the spammer answered
before the gold check paused them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from services.cli.bench_labeling import load_descriptions
from services.cli.client import Clients
from services.cli.commands import console, export, ingest_records
from services.cli.files import InputError, Record, read_records
from services.cli.stack import Stack
from services.cli.workforce import Profile, Workforce, WorkforceConfig
from services.gen.tandem.ingest.v1 import ingest_pb2
from services.gen.tandem.projects.v1 import projects_pb2
from services.gen.tandem.workforce.v1 import workforce_pb2
from services.review import aggregation
from services.review.aggregation import Judgment

DESCRIPTIONS = Path(__file__).resolve().parents[2] / "loadtests" / "descriptions"


@dataclass(frozen=True)
class SimulateOptions:
    data: Path
    descriptions: Path | None = None
    sample: int = 600
    gold: int = 60
    overlap: int = 3
    max_overlap: int = 0
    seed: int = 0
    repeat: int = 1
    # "count@accuracy" groups; "spammer" answers at random.
    workforce: tuple[str, ...] = ("5@0.95", "3@0.75", "1@spammer")
    seconds_per_item: float = 0.05
    quality_bar: float = 0.7
    state_dir: Path = Path(".state/bench")
    nats_url: str | None = None
    database_url: str | None = None


@dataclass
class SimulateResult:
    items: int
    overlap: int
    service_accuracy: float
    majority_vote: float
    dawid_skene: float
    labels: int
    spammer_tasks: dict[str, int] = field(default_factory=dict)
    paused: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def profiles(groups: tuple[str, ...], seconds: float) -> tuple[Profile, ...]:
    people: list[Profile] = []
    for group in groups:
        count, _, kind = group.partition("@")
        try:
            n = int(count)
            spammer = kind == "spammer"
            accuracy = 0.0 if spammer else float(kind)
        except ValueError as exc:
            raise InputError(f"workforce groups are COUNT@ACCURACY or COUNT@spammer, got {group!r}") from exc
        if n < 1 or not (spammer or 0.0 < accuracy <= 1.0):
            raise InputError(f"workforce group {group!r}: a positive count and an accuracy in (0, 1]")
        tag = "spam" if spammer else f"a{round(accuracy * 100)}"
        # A spammer clicks fast: the sooner they are found out, the less they cost.
        speed = seconds / 3 if spammer else seconds
        people += [Profile(f"{tag}-{len(people) + i + 1:02d}", accuracy, speed, spammer) for i in range(n)]
    return tuple(people)


def _split(options: SimulateOptions) -> tuple[list[Record], list[Record]]:
    records = [r for r in read_records(options.data) if r.label]
    if len(records) < options.sample + options.gold:
        raise InputError(f"{options.data}: {len(records)} labeled rows, fewer than --sample + gold")
    rng = random.Random(options.seed)
    rng.shuffle(records)
    return records[: options.sample], records[options.sample : options.sample + options.gold]


def _accuracy(labels: dict[str, str], truth: dict[str, str]) -> float:
    return sum(labels.get(i) == t for i, t in truth.items()) / len(truth)


async def run_simulated(options: SimulateOptions) -> list[SimulateResult]:
    """One project per seed (seed, seed + 1, ...) on one running stack; a table per run, then the
    summary over the runs."""
    descriptions = options.descriptions or DESCRIPTIONS / f"{options.data.parent.name}.yaml"
    if not descriptions.exists():
        raise InputError(f"no label descriptions at {descriptions}: pass --descriptions")
    labels = load_descriptions(descriptions)
    people = profiles(options.workforce, options.seconds_per_item)
    results = []
    with console.status("starting the stack…"):
        stack = await asyncio.to_thread(
            Stack(options.state_dir, nats_url=options.nats_url, database_url=options.database_url).start
        )
    try:
        async with Clients(stack.targets, token=stack.admin_token) as clients:
            for rep in range(max(options.repeat, 1)):
                run = dataclasses.replace(options, seed=options.seed + rep)
                pool, gold = _split(run)
                results.append(await _run(clients, run, labels, pool, gold, people))
                console.print(result_table(results[-1]))
    finally:
        with console.status("stopping the stack…"):
            await asyncio.to_thread(stack.stop)
    if len(results) > 1:
        console.print(summary_table(results))
    return results


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"


def summary_table(results: list[SimulateResult]) -> Table:
    table = Table(title=f"Simulated workforce, {len(results)} runs (mean ± std)")
    table.add_column("final labels by")
    table.add_column("accuracy", justify="right")
    table.add_row("the service (as it went)", _mean_std([r.service_accuracy for r in results]))
    table.add_row("Dawid-Skene (raw labels, offline)", _mean_std([r.dawid_skene for r in results]))
    table.add_row("majority vote (raw labels, offline)", _mean_std([r.majority_vote for r in results]))
    pauses = [t for r in results for name in r.spammer_tasks for t in [r.paused.get(name, -1)]]
    shown = ", ".join("never" if t < 0 else str(t) for t in pauses)
    table.add_row("spammer paused after (tasks, each run)", shown)
    return table


async def _run(
    clients: Clients,
    options: SimulateOptions,
    labels: dict[str, str],
    pool: list[Record],
    gold: list[Record],
    people: tuple[Profile, ...],
) -> SimulateResult:
    project_id = f"bench-workforce-{uuid.uuid4().hex[:8]}"
    project = projects_pb2.Project(
        project_id=project_id,
        labels=[projects_pb2.LabelDef(name=k, description=v) for k, v in labels.items()],
        target_accuracy=0.95,
        control_rate=1.0,  # every item to people: the aggregation is what is measured
        overlap=options.overlap,
        max_overlap=options.max_overlap,
        # Gold: the service's defaults (a new person's first 30 tasks half gold, then 10%).
        quality_bar=options.quality_bar,
    )
    await clients.ingest.CreateProject(ingest_pb2.CreateProjectRequest(project=project), timeout=30)
    await clients.workforce.AddGold(
        workforce_pb2.AddGoldRequest(
            project_id=project_id,
            items=[
                workforce_pb2.GoldItem(
                    external_id=f"gold:{r.external_id}",
                    text=r.text.decode("utf-8", "replace"),
                    answer=r.label,
                )
                for r in gold
            ],
        ),
        timeout=30,
    )
    started = time.monotonic()
    summary = await ingest_records(clients, project_id, pool, quiet=True)
    total = summary.accepted

    async def complete() -> bool:
        s = await clients.stats(project_id)
        return s.export.finalized >= total and s.scorer.in_review == 0

    truth = {r.external_id: r.label for r in pool}
    answers = {**truth, **{f"gold:{r.external_id}": r.label for r in gold}}
    workforce = Workforce(
        clients,
        answers,
        WorkforceConfig(project_id=project_id, seed=options.seed, profiles=people, idle_poll_seconds=0.1),
    )
    with console.status(f"{len(people)} simulated people labeling {total} items, overlap {options.overlap}…"):
        stats = await workforce.run(complete)
    # The last refit of the aggregation may still republish a few labels: give it its period.
    await asyncio.sleep(6.0)
    _, path = await export(clients, project_id, options.state_dir / "exports" / f"{project_id}.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    final = {r["id"]: r["label"] for r in rows}
    judgments = [
        Judgment(r["id"], raw["annotator_id"], raw["label"]) for r in rows for raw in r.get("raw_labels", [])
    ]
    names = list(labels)
    mv = {i: a.label for i, a in aggregation.majority_vote(judgments, names).items()}
    ds = {i: a.label for i, a in aggregation.fit_dawid_skene(judgments, names).aggregates().items()}
    spammers = {p.name for p in people if p.spammer}
    return SimulateResult(
        items=len(rows),
        overlap=options.overlap,
        service_accuracy=_accuracy(final, truth),
        majority_vote=_accuracy(mv, truth),
        dawid_skene=_accuracy(ds, truth),
        labels=len(judgments),
        spammer_tasks={n: stats.by_annotator.get(n, 0) for n in spammers},
        paused=dict(stats.paused_after),
        seconds=time.monotonic() - started,
    )


def result_table(r: SimulateResult) -> Table:
    table = Table(title=f"Simulated workforce: {r.items} items, overlap {r.overlap}, {r.labels} raw labels")
    table.add_column("final labels by")
    table.add_column("accuracy", justify="right")
    table.add_row("the service (as it went)", f"{r.service_accuracy:.4f}")
    table.add_row("Dawid-Skene (raw labels, offline)", f"{r.dawid_skene:.4f}")
    table.add_row("majority vote (raw labels, offline)", f"{r.majority_vote:.4f}")
    for name, tasks in sorted(r.spammer_tasks.items()):
        when = r.paused.get(name)
        table.add_row(
            f"spammer {name}",
            f"paused after {when} tasks" if when is not None else f"NOT paused ({tasks} tasks)",
        )
    others = {n: t for n, t in r.paused.items() if n not in r.spammer_tasks}
    if others:
        table.add_row("also paused", ", ".join(f"{n} after {t}" for n, t in sorted(others.items())))
    table.caption = (
        f"{r.seconds:.0f} s. Goals: Dawid-Skene >= 0.97 and above majority vote; the spammer paused"
        " within 30 of their tasks."
    )
    return table
