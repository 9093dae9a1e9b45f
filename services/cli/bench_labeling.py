"""`tandem bench labeling`: the real services, the simulated workforce, a labeled pool.

For each target accuracy and seed it runs the active-learning loop with no budget, then the
random-review baseline at the human share the active run used (people label random items, the
model labels the rest), and reports both with the labeler-only baseline (zero-shot argmax, no
people) computed with the same model and label descriptions. Optional `--budgets` adds runs with
a fixed human budget. Every run is a fresh project on one running stack: items are ingested and
pre-labeled first (a pool), then the annotators start.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import yaml
from rich.table import Table

from services.cli.client import Clients
from services.cli.commands import console, export, ingest_records
from services.cli.files import InputError, Record, read_records
from services.cli.stack import Stack
from services.cli.workforce import Workforce, WorkforceConfig
from services.gen.tandem.ingest.v1 import ingest_pb2
from services.gen.tandem.projects.v1 import projects_pb2


@dataclass(frozen=True)
class BenchOptions:
    data: Path
    descriptions: Path
    targets: tuple[float, ...] = (0.95,)
    budgets: tuple[float, ...] = ()
    sample: int = 0
    dedupe: bool = False
    exclude_labels: tuple[str, ...] = ()
    repeat: int = 1
    seed: int = 0
    annotators: int = 8
    seconds_per_item: float = 0.1
    error_rate: float = 0.02
    guarantee: str = "dataset"
    human_error: float = 0.02
    baseline: bool = True
    # People label blind (the project hides suggestions): every label that disagrees with the
    # model goes to a second person, and the certificate bounds people's errors from those checks.
    blind: bool = False
    # The CPU labeler's sentence model (services/inference/encoders.py), for the stack and the
    # labeler-only baseline alike.
    encoder: str = "minilm"
    state_dir: Path = Path(".state/bench")
    out: Path | None = None
    nats_url: str | None = None
    database_url: str | None = None


@dataclass(frozen=True)
class RunResult:
    dataset: str
    arm: str  # active | random | labeler
    target: float
    budget: float  # share of items people were allowed to label (0 = unlimited)
    seed: int
    items: int
    pool_accuracy: float
    human_share: float
    auto_share: float
    auto_accuracy: float
    below_target_share: float
    seconds: float
    # The scorer's certificate at the end (0 for the baselines): accuracy guaranteed with
    # probability 1 - delta for the dataset (or the automatic labels alone).
    certified_accuracy: float = 0.0
    # Labels beyond one per item: second opinions (disagreeing audits, checks of blind labels and
    # confident learning's doubts), not in human_share.
    second_opinions: int = 0


def dataset_name(path: Path) -> str:
    """`ag_news/test.jsonl` → `ag_news`: the shared datasets name their files by split."""
    return path.parent.name if path.stem in ("test", "data", "train", "validation") else path.stem


def load_descriptions(path: Path) -> dict[str, str]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read label descriptions {path}: {exc}") from exc
    if not isinstance(data, dict) or len(data) < 2:
        raise InputError(f"{path}: expected a mapping label → description with at least two labels")
    return {str(k): str(v or "") for k, v in data.items()}


def load_pool(options: BenchOptions, labels: dict[str, str], seed: int) -> list[Record]:
    records = [r for r in read_records(options.data) if r.label and r.label not in options.exclude_labels]
    unknown = sorted({r.label for r in records} - set(labels))
    if unknown:
        raise InputError(f"labels without a description in {options.descriptions}: {unknown[:10]}")
    if options.dedupe:
        seen: set[bytes] = set()
        unique = []
        for r in records:
            key = b" ".join(r.text.split())
            if key not in seen:
                seen.add(key)
                unique.append(r)
        records = unique
    rng = random.Random(seed)
    rng.shuffle(records)
    if options.sample:
        records = records[: options.sample]
    return records


def labeler_only(records: list[Record], labels: dict[str, str], encoder: str) -> float:
    """Zero-shot accuracy of the CPU labeler with the same descriptions and sentence model the
    services use."""
    from services.inference.sentence_labeler import SentenceLabeler

    labeler = SentenceLabeler(encoder=encoder)
    names = list(labels)
    label_emb = labeler.embed_labels(list(labels.items()))
    probs = labeler.zero_shot(labeler.embed([r.text.decode("utf-8", "replace") for r in records]), label_emb)
    predicted = probs.argmax(axis=1)
    return float(sum(names[p] == r.label for p, r in zip(predicted, records, strict=True)) / len(records))


async def run_arm(
    clients: Clients,
    records: list[Record],
    labels: dict[str, str],
    options: BenchOptions,
    *,
    arm: str,
    target: float,
    budget: float,
    seed: int,
) -> RunResult:
    project_id = f"bench-{arm}-{uuid.uuid4().hex[:8]}"
    project = projects_pb2.Project(
        project_id=project_id,
        labels=[projects_pb2.LabelDef(name=k, description=v) for k, v in labels.items()],
        target_accuracy=target,
        human_budget_share=budget,
        control_rate=1.0 if arm == "random" else 0.0,
        guarantee=options.guarantee,
        human_error=options.human_error,
        hide_suggestions=options.blind,
    )
    await clients.ingest.CreateProject(ingest_pb2.CreateProjectRequest(project=project), timeout=30)
    started = time.monotonic()
    summary = await ingest_records(clients, project_id, records, quiet=True)
    total = summary.accepted
    await _until_prelabeled(clients, project_id, total)

    async def complete() -> bool:
        # Every item final in the export, the scorer caught up with every human label (the next
        # run must not compete with this one's backlog), and no task left open: a second opinion
        # still out is a disagreement the certificate counts as wrong until it is answered.
        s = await clients.stats(project_id)
        return (
            s.export.finalized >= total
            and s.scorer.in_review == 0
            and s.review.open == 0
            and s.review.leased == 0
        )

    gold = {r.external_id: r.label for r in records}
    workforce = Workforce(
        clients,
        gold,
        WorkforceConfig(
            project_id=project_id,
            annotators=options.annotators,
            error_rate=options.error_rate,
            seconds_per_item=options.seconds_per_item,
            seed=seed,
        ),
    )
    await workforce.run(complete)
    seconds = time.monotonic() - started
    scorer = (await clients.stats(project_id)).scorer
    certified = scorer.certified_accuracy if arm == "active" else 0.0
    _, path = await export(clients, project_id, options.state_dir / "exports" / f"{project_id}.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    correct = [r["label"] == gold[r["id"]] for r in rows]
    auto = [c for r, c in zip(rows, correct, strict=True) if r["source"] == "auto"]
    return RunResult(
        dataset=dataset_name(options.data),
        arm=arm,
        target=target,
        budget=budget,
        seed=seed,
        items=len(rows),
        pool_accuracy=sum(correct) / len(rows),
        human_share=sum(r["source"] == "human" for r in rows) / len(rows),
        auto_share=len(auto) / len(rows),
        auto_accuracy=sum(auto) / len(auto) if auto else 0.0,
        below_target_share=sum(r["below_target"] for r in rows) / len(rows),
        seconds=seconds,
        certified_accuracy=certified,
        second_opinions=scorer.second_opinions,
    )


async def _until_prelabeled(clients: Clients, project_id: str, total: int, within: float = 1800.0) -> None:
    """A pool: every item is pre-labeled before the people start."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if (await clients.stats(project_id)).scorer.predicted >= total:
                return
        except grpc.aio.AioRpcError as exc:
            # Counting a pool being ingested can outlast one call's deadline on a loaded machine.
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
        await asyncio.sleep(0.5)
    raise TimeoutError(f"{project_id}: items were not pre-labeled within {within:.0f} s")


def _append(out: Path | None, result: RunResult) -> None:
    """One run's result as a JSON line, as soon as it is known (a later run that fails loses none)."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(asdict(result)) + "\n")


def results_table(results: list[RunResult]) -> Table:
    table = Table(title="tandem bench labeling", header_style="bold")
    for col in (
        "dataset",
        "arm",
        "target",
        "budget",
        "seed",
        "items",
        "pool acc",
        "human",
        "auto",
        "auto acc",
        "below target",
        "certified",
        "2nd opinions",
        "seconds",
    ):
        table.add_column(col, justify="right" if col not in ("dataset", "arm") else "left")
    for r in results:
        table.add_row(
            r.dataset,
            r.arm,
            f"{r.target:.2f}" if r.arm != "labeler" else "-",
            f"{r.budget:.1%}" if r.budget else "-",
            str(r.seed),
            f"{r.items:,}",
            f"{r.pool_accuracy:.4f}",
            f"{r.human_share:.1%}",
            f"{r.auto_share:.1%}",
            f"{r.auto_accuracy:.4f}" if r.auto_share else "-",
            f"{r.below_target_share:.1%}",
            f"{r.certified_accuracy:.4f}" if r.arm == "active" else "-",
            f"{r.second_opinions:,}" if r.arm != "labeler" else "-",
            f"{r.seconds:.0f}",
        )
    return table


async def run_bench(options: BenchOptions) -> list[RunResult]:
    labels = load_descriptions(options.descriptions)
    results: list[RunResult] = []
    with console.status("starting the stack…"):
        stack = await asyncio.to_thread(
            Stack(
                options.state_dir,
                nats_url=options.nats_url,
                database_url=options.database_url,
                extra_env={"TANDEM_INFERENCE_ENCODER": options.encoder},
            ).start
        )
    try:
        async with Clients(stack.targets, token=stack.admin_token) as clients:
            for rep in range(options.repeat):
                seed = options.seed + rep
                records = load_pool(options, labels, seed)
                with console.status(f"labeler-only baseline on {len(records):,} items…"):
                    zero_shot = await asyncio.to_thread(labeler_only, records, labels, options.encoder)
                name = dataset_name(options.data)
                results.append(
                    RunResult(name, "labeler", 0.0, 0.0, seed, len(records), zero_shot, 0, 0, 0, 0, 0)
                )
                _append(options.out, results[-1])
                for target in options.targets:
                    runs = [("active", 0.0)] + [("active", b) for b in options.budgets]
                    for arm, budget in runs:
                        with console.status(
                            f"{arm} arm, target {target}, budget {budget or 'none'}, seed {seed}…"
                        ):
                            active = await run_arm(
                                clients,
                                records,
                                labels,
                                options,
                                arm=arm,
                                target=target,
                                budget=budget,
                                seed=seed,
                            )
                        results.append(active)
                        console.print(results_table([active]))
                        _append(options.out, active)
                        if not options.baseline:
                            continue
                        # The baseline gets exactly the share of people the active run used.
                        with console.status(f"random review at {active.human_share:.1%}…"):
                            baseline = await run_arm(
                                clients,
                                records,
                                labels,
                                options,
                                arm="random",
                                target=target,
                                budget=max(active.human_share, 1e-6),
                                seed=seed,
                            )
                        results.append(baseline)
                        console.print(results_table([baseline]))
                        _append(options.out, baseline)
    finally:
        with console.status("stopping the stack…"):
            await asyncio.to_thread(stack.stop)
    console.print(results_table(results))
    if options.out is not None:
        console.print(f"results appended to {options.out}")
    return results
