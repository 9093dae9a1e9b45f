"""`tandem demo` (what `make run` runs): the whole loop on the BBC News corpus.

Starts the stack (local nats-server and PostgreSQL from their wheels, the five services),
creates a project with label descriptions, ingests the 2,225 articles, lets simulated
annotators answer the review queue from the gold labels, shows live progress, then exports the
final labels and reports their accuracy against the gold labels.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.cli.bbc import BBC_LABELS, DemoItem, load_bbc
from services.cli.client import Clients
from services.cli.commands import console, export, ingest_records, print_ingest_summary, project_complete
from services.cli.files import Record
from services.cli.stack import Stack
from services.cli.views import certificate_line, stats_table
from services.cli.workforce import Workforce, WorkforceConfig
from services.gen.tandem.ingest.v1 import ingest_pb2
from services.gen.tandem.projects.v1 import projects_pb2
from services.gen.tandem.stats.v1 import stats_pb2

PROJECT_ID = "bbc-news"


@dataclass(frozen=True)
class DemoOptions:
    state_dir: Path
    # People are slower than the labeler (as in life): a queue forms and refits can empty it.
    annotators: int = 2
    seconds_per_item: float = 1.0
    error_rate: float = 0.02
    target_accuracy: float = 0.95
    limit: int = 0  # 0 = the whole corpus
    max_minutes: float = 30.0
    seed: int = 2026
    nats_url: str | None = None
    database_url: str | None = None


@dataclass(frozen=True)
class Report:
    items: int
    duplicates: int
    exported: int
    accuracy: float
    human_share: float
    auto_count: int
    auto_accuracy: float
    human_accuracy: float
    items_per_second: float
    seconds: float
    path: Path


def score_export(path: Path, gold: dict[str, str], accepted: int, duplicates: int, seconds: float) -> Report:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    ids = [r["id"] for r in rows]
    if len(ids) != len(set(ids)):
        raise RuntimeError("the export holds an item twice")
    correct = [r["label"] == gold.get(r["id"]) for r in rows]
    auto = [c for r, c in zip(rows, correct, strict=True) if r["source"] == "auto"]
    human = [c for r, c in zip(rows, correct, strict=True) if r["source"] == "human"]
    return Report(
        items=accepted,
        duplicates=duplicates,
        exported=len(rows),
        accuracy=sum(correct) / len(rows) if rows else 0.0,
        human_share=len(human) / len(rows) if rows else 0.0,
        auto_count=len(auto),
        auto_accuracy=sum(auto) / len(auto) if auto else 0.0,
        human_accuracy=sum(human) / len(human) if human else 0.0,
        items_per_second=len(rows) / seconds if seconds else 0.0,
        seconds=seconds,
        path=path,
    )


def progress_line(s: stats_pb2.ProjectStats, total: int, elapsed: float) -> str:
    human = s.export.by_source.get("human", 0)
    sc = s.scorer
    return (
        f"[{elapsed:5.0f}s] pre-labeled {sc.predicted}/{total}, final {s.export.finalized}/{total} "
        f"(auto {s.export.by_source.get('auto', 0)}, human {human}), waiting for people {sc.in_review}, "
        f"certified {sc.guarantee or 'dataset'} accuracy {sc.certified_accuracy:.3f}"
    )


def report_table(r: Report, target: float, certificate: str = "") -> Table:
    table = Table(title="Tandem demo: BBC News (2,225 articles, 5 classes)", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row(
        "items exported",
        f"{r.exported:,} of {r.items:,} accepted, each exactly once "
        f"({r.duplicates} verbatim duplicate articles reported at ingest)",
    )
    table.add_row("final-label accuracy vs gold", f"{r.accuracy:.4f}")
    table.add_row("labeled by people", f"{r.human_share:.1%} ({round(r.human_share * r.exported):,} items)")
    table.add_row(
        "auto-accepted labels",
        f"{r.auto_count:,}, measured accuracy {r.auto_accuracy:.4f} (target {target:.2f})",
    )
    table.add_row("human labels (simulated, with errors)", f"accuracy {r.human_accuracy:.4f}")
    if certificate:
        table.add_row("certified", certificate)
    table.add_row("throughput", f"{r.items_per_second:.1f} items/s over {r.seconds:.0f} s")
    table.add_row("export", str(r.path))
    return table


async def run_demo(options: DemoOptions) -> Report:
    corpus = load_bbc()
    # The corpus is stored topic by topic; a real stream is mixed. Arrival in topic order would
    # show the scorer one class for the first minutes (see the closing notes on drift).
    random.Random(options.seed).shuffle(corpus)
    if options.limit:
        corpus = corpus[: options.limit]
    gold = {it.id: it.label for it in corpus}
    if options.state_dir.exists():
        shutil.rmtree(options.state_dir)
    with console.status(
        "starting nats-server, PostgreSQL, the services and the web app (the labeler loads a model)…"
    ):
        stack = await asyncio.to_thread(
            Stack(options.state_dir, nats_url=options.nats_url, database_url=options.database_url).start
        )
    try:
        console.print("stack ready: " + ", ".join(f"{n} {t}" for n, t in stack.targets.items()))
        web = web_line(stack)
        console.print(web + " (while the demo runs; `tandem up` keeps it running)")
        async with Clients(stack.targets, token=stack.admin_token) as clients:
            report = await _loop(clients, corpus_records(corpus), gold, options)
        console.print(web + " — `make up` (or `tandem up`) serves it until Ctrl-C")
        return report
    finally:
        with console.status("stopping the stack…"):
            await asyncio.to_thread(stack.stop)


def web_line(stack: Stack) -> str:
    admin = stack.admin
    return f"web app: {stack.web_url}  login: {admin['user_id']} / {admin['password']}"


def corpus_records(corpus: list[DemoItem]) -> list[Record]:
    return [Record(it.id, it.text.encode("utf-8"), it.label, {"source": "bbc"}) for it in corpus]


async def _loop(
    clients: Clients, records: list[Record], gold: dict[str, str], options: DemoOptions
) -> Report:
    project = projects_pb2.Project(
        project_id=PROJECT_ID,
        name="BBC News topics",
        instructions="Pick the topic of the news article.",
        target_accuracy=options.target_accuracy,
        # The simulated people err at this rate; the certificate must not take them as right.
        human_error=options.error_rate,
        labels=[projects_pb2.LabelDef(name=k, description=v) for k, v in BBC_LABELS.items()],
    )
    await clients.ingest.CreateProject(ingest_pb2.CreateProjectRequest(project=project), timeout=30)
    started = time.monotonic()
    summary = await ingest_records(clients, PROJECT_ID, records)
    print_ingest_summary(summary)

    workforce = Workforce(
        clients,
        gold,
        WorkforceConfig(
            project_id=PROJECT_ID,
            annotators=options.annotators,
            error_rate=options.error_rate,
            seconds_per_item=options.seconds_per_item,
        ),
    )
    deadline = started + options.max_minutes * 60

    async def done() -> bool:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the demo did not finish within {options.max_minutes} minutes")
        return await project_complete(clients, PROJECT_ID)

    # The corpus holds a few verbatim duplicate articles; ingest reports them and keeps one copy.
    total = summary.accepted
    progress = Progress(
        TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    )
    bars = {
        "pre": progress.add_task("pre-labeled", total=total),
        "final": progress.add_task("final labels", total=total),
        "human": progress.add_task("labeled by people", total=total),
    }
    stop = asyncio.Event()
    with Live(console=console, refresh_per_second=4) as live:

        async def refresh() -> None:
            last_line = 0.0
            while not stop.is_set():
                s = await clients.stats(PROJECT_ID)
                if not console.is_terminal and time.monotonic() - last_line >= 10:
                    # A log or a pipe gets a plain line now and then instead of a redrawn view.
                    last_line = time.monotonic()
                    console.print(progress_line(s, total, last_line - started), soft_wrap=True)
                progress.update(bars["pre"], completed=s.scorer.predicted)
                progress.update(bars["final"], completed=s.export.finalized)
                progress.update(bars["human"], completed=s.export.by_source.get("human", 0))
                live.update(Group(progress, stats_table(s, time.monotonic() - started)))
                await asyncio.sleep(1.0)

        refresher = asyncio.create_task(refresh())
        try:
            crew = await workforce.run(done, stop)
        finally:
            stop.set()
            await asyncio.gather(refresher, return_exceptions=True)
    seconds = time.monotonic() - started
    final_stats = await clients.stats(PROJECT_ID)
    console.print(stats_table(final_stats, seconds))
    info, path = await export(clients, PROJECT_ID, None)
    report = score_export(path, gold, total, summary.duplicates, seconds)
    console.print(report_table(report, options.target_accuracy, certificate_line(final_stats.scorer)))
    console.print(
        f"human labels came from {len(crew.by_annotator)} simulated annotators, each a user who logged in: "
        + ", ".join(f"{name} {n}" for name, n in sorted(crew.by_annotator.items()))
    )
    if info.rows != total:
        raise RuntimeError(f"exported {info.rows} rows for {total} accepted items")
    return report
