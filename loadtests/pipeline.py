"""Saturation benchmark of the whole pipeline: ingest → inference → scorer → export, bounded.

    python -m loadtests.pipeline --items 1000000
    python -m loadtests.pipeline --items 20000 --rate 5000 --duration 600 --json /tmp/p.json
    python -m loadtests.pipeline --items 50000 --route review      # items end waiting in review
    python -m loadtests.pipeline --items 20000 --state-dir /tmp/pl  # kept: logs and the database

Starts nats-server, PostgreSQL and ingest, inference, scorer, review and export locally (loopback
only) with the replay labeler (TANDEM_INFERENCE_BACKEND=replay: hashed distributions and 384-d
embeddings at memory speed, so this measures the platform and not a model). One project with
`--labels` labels; news-like texts of ~150 characters, seeded and unique, go in through one
BulkSubmit stream of `--batch` items per request, as fast as the stack takes them or capped at
`--rate` items/s, until `--items` are in or `--duration` seconds (ingest + drain) are over.

Routes: `model` (default) makes the project's human budget spent from the first item (a share so
small that floor(share × items) is 0), so the scorer finalizes each item with the model's label
at once (source `model`, below target) and the export receives it: every hop is on the path.
`review` is a normal project: items end as review tasks nobody labels, and the export has no
final labels to show.

Before the pipeline, on the same nats-server: the nats-py ceiling, JetStream publish (async,
pipelined, with acks) and pull-consumer fetch of messages the size of a PredictionBatch of one
ingest bus batch with 384-float embeddings (the busiest hop), as messages/s and items/s.

Sampled once a second: stage counts, the lag (pending + ack-pending) of every durable consumer,
CPU % and RSS of each service (with its child processes), of PostgreSQL (the postmaster and its
backends) and of nats-server. Printed at the end: per stage the items, items/s from the first
submit to the stage's last item and p50/p99 of the stage's own latency per item (from the
timestamps in PostgreSQL; ingest's counts from the moment the request was handed to the stream,
so it includes the time a request waits in the stream's flow-control window); end to end items/s
and ingest → export latency; the lag over time; CPU and RSS; the ceiling and the ratio end to
end ÷ ceiling; the bus handlers' times from /metrics; the scorer's refit histogram when the
scorer exports one. `--json` writes all of it.
The figures are a report: nothing is asserted.
"""

from __future__ import annotations

import os

# The stack forks (pgserver runs pg_ctl) while this process's gRPC threads run: gRPC's fork
# handlers are not wanted there (see tests/conftest.py). Read when grpc is first imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import argparse
import asyncio
import contextlib
import json
import math
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import nats

# psutil comes with pgserver (a dependency) and ships no type information.
import psutil
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.cli.client import Clients
from services.cli.stack import Stack, StackError
from services.cli.workforce import Workforce, WorkforceConfig
from services.gen.tandem.ingest.v1 import ingest_pb2
from services.gen.tandem.predictions.v1 import predictions_pb2
from services.gen.tandem.projects.v1 import projects_pb2
from services.inference.replay_backend import replay_class
from services.ingest.settings import IngestSettings

SERVICES = ("ingest", "inference", "scorer", "review", "export")
# Simulated people log in (route review with --human-labels).
WITH_PEOPLE = ("identity", *SERVICES)
ROUTES = ("model", "review")
# Far below any 1/items: floor(share × seen) stays 0, so the budget is spent from the first item
# (a share of 0 would mean "no cap", and a count of 0 too).
SPENT_BUDGET_SHARE = 1e-12
# Items per bus message out of ingest (and so per PredictionBatch): its setting's default.
BUS_BATCH_ITEMS = int(IngestSettings.model_fields["publish_batch_items"].default)
EMBEDDING_DIM = 384
SCRATCH_STREAM = "LOADTEST_CEILING"
SCRATCH_SUBJECT = "loadtest.ceiling"

DESKS = ("business", "politics", "sport", "tech", "culture", "science")
SUBJECTS = (
    "Shares in",
    "Officials at",
    "Fans of",
    "Analysts tracking",
    "Engineers at",
    "Voters near",
    "Regulators probing",
    "Investors in",
    "Coaches at",
    "Researchers from",
)
NAMES = (
    "Northwind Traders",
    "the city council",
    "United",
    "the central bank",
    "Contoso Labs",
    "the national league",
    "Fabrikam",
    "the health ministry",
    "Tailspin Toys",
    "the film academy",
    "Litware",
    "the port authority",
)
VERBS = (
    "reported",
    "warned of",
    "celebrated",
    "announced",
    "rejected",
    "braced for",
    "questioned",
    "welcomed",
)
OBJECTS = (
    "a surprise quarterly profit",
    "a late equaliser in the derby",
    "new export rules for chips",
    "a record turnout at the polls",
    "delays to the new stadium",
    "a cut in interest rates",
    "a sequel to the summer hit",
    "cloud outages across the region",
    "a rise in fuel prices",
    "a vaccine trial with strong results",
)
TAILS = (
    "on Tuesday",
    "amid rising costs",
    "after weeks of talks",
    "despite the weather",
    "ahead of the summit",
    "as markets closed",
    "in a statement",
)


# -- options and results -------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineOptions:
    items: int = 20_000
    rate: float = 0.0  # items/s cap on submission; 0 = as fast as the stack takes them
    duration: float = 3600.0  # seconds of ingest + drain at most
    labels: int = 4
    batch: int = 500  # items per BulkSubmit request
    route: str = "model"
    seed: int = 0
    state_dir: Path | None = None  # None: a temp dir, removed unless keep
    keep: bool = False
    nats_url: str | None = None
    database_url: str | None = None
    ceiling_messages: int = 1000
    # Route review: after the pool is in, simulated people (answering the replay labeler's class)
    # label this many items through review, so the scorer refits with every item waiting.
    human_labels: int = 0
    annotators: int = 8
    quiet: bool = False  # no progress display and no tables (the tests)


@dataclass
class Sample:
    t: float  # seconds since the first submit
    counts: dict[str, int]
    lag: dict[str, int]  # consumer → pending + ack-pending
    cpu: dict[str, float]  # process group → % of one CPU since the previous sample
    rss: dict[str, int]  # process group → bytes


@dataclass
class StageResult:
    stage: str
    items: int
    items_per_s: float
    p50_ms: float
    p99_ms: float
    latency: str  # what the latency is measured between


@dataclass
class Ceiling:
    messages: int
    message_bytes: int
    items_per_message: int
    publish_msgs_per_s: float
    fetch_msgs_per_s: float

    @property
    def publish_items_per_s(self) -> float:
        return self.publish_msgs_per_s * self.items_per_message

    @property
    def fetch_items_per_s(self) -> float:
        return self.fetch_msgs_per_s * self.items_per_message

    @property
    def items_per_s(self) -> float:
        return min(self.publish_items_per_s, self.fetch_items_per_s)


@dataclass
class ProcessStats:
    name: str
    cpu_mean: float
    cpu_peak: float
    rss_peak_mb: float


@dataclass
class HandlerStats:
    consumer: str
    messages: int
    mean_ms: float
    p50_ms: float  # from the histogram's buckets, interpolated as Prometheus does
    p99_ms: float
    items_per_message: float


@dataclass
class PipelineResult:
    route: str
    project_id: str
    items: int  # asked for
    submitted: int
    accepted: int
    seconds: float  # first submit → end of drain
    completed: bool  # every accepted item reached the end before the deadline
    stages: list[StageResult]
    end_to_end: StageResult
    ceiling: Ceiling
    processes: list[ProcessStats]
    handlers: list[HandlerStats]
    samples: list[Sample] = field(default_factory=list)
    refit: dict[str, float] | None = None  # the scorer's refit figures (see scorer_figures)
    labeling_seconds: float = 0.0  # route review with human labels: how long people labeled

    @property
    def ratio(self) -> float:
        return self.end_to_end.items_per_s / self.ceiling.items_per_s if self.ceiling.items_per_s else 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ceiling"].update(
            publish_items_per_s=self.ceiling.publish_items_per_s,
            fetch_items_per_s=self.ceiling.fetch_items_per_s,
            items_per_s=self.ceiling.items_per_s,
        )
        out["ratio_end_to_end_to_ceiling"] = self.ratio
        return out


class LoadTestError(RuntimeError):
    """The run could not go on (the stack did not start, the project was refused)."""


# -- the items -----------------------------------------------------------------------------------


def external_id(n: int) -> str:
    return f"lt-{n:09d}"


def make_texts(seed: int, lo: int, hi: int) -> list[str]:
    """Texts lo..hi-1: the same for the same seed, unique by their number, ~150 characters."""
    rng = random.Random(seed * 1_000_003 + lo)
    out = []
    for n in range(lo, hi):
        first = f"{rng.choice(SUBJECTS)} {rng.choice(NAMES)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
        second = f"{rng.choice(NAMES).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
        out.append(f"{first} {rng.choice(TAILS)}. {second} {rng.choice(TAILS)} (report {n}).")
    return out


def _request(project_id: str, seed: int, lo: int, hi: int) -> ingest_pb2.SubmitBatchRequest:
    texts = make_texts(seed, lo, hi)
    return ingest_pb2.SubmitBatchRequest(
        project_id=project_id,
        items=[
            ingest_pb2.RawItem(
                external_id=external_id(n), text=t.encode(), metadata={"desk": DESKS[n % len(DESKS)]}
            )
            for n, t in zip(range(lo, hi), texts, strict=True)
        ],
    )


def project_for(project_id: str, options: PipelineOptions) -> projects_pb2.Project:
    labels = [
        projects_pb2.LabelDef(name=f"class-{k}", description=f"news of kind {k}")
        for k in range(options.labels)
    ]
    project = projects_pb2.Project(project_id=project_id, name="pipeline load test", labels=labels)
    if options.route == "model":
        project.human_budget_share = SPENT_BUDGET_SHARE
    return project


class Submitter:
    """Feeds one BulkSubmit stream, paced to the rate, and notes when each request left."""

    def __init__(self, clients: Clients, project_id: str, options: PipelineOptions, deadline: float) -> None:
        self._clients = clients
        self._project_id = project_id
        self._options = options
        self._deadline = deadline
        self.started_wall = 0.0
        self.started = 0.0
        self.submitted = 0
        self.sent_at: list[float] = []  # wall time at which request i (items i*batch…) was yielded
        self.response: ingest_pb2.BulkSubmitResponse | None = None

    async def _requests(self) -> AsyncIterator[ingest_pb2.SubmitBatchRequest]:
        o = self._options
        for lo in range(0, o.items, o.batch):
            if time.monotonic() >= self._deadline:
                return
            if o.rate > 0:
                due = self.started + lo / o.rate
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
            hi = min(o.items, lo + o.batch)
            request = await asyncio.to_thread(_request, self._project_id, o.seed, lo, hi)
            self.sent_at.append(time.time())
            self.submitted = hi
            yield request

    async def run(self) -> ingest_pb2.BulkSubmitResponse:
        self.started, self.started_wall = time.monotonic(), time.time()
        timeout = max(self._deadline - time.monotonic(), 1.0) + 120
        try:
            self.response = await self._clients.ingest.BulkSubmit(self._requests(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise LoadTestError(f"BulkSubmit failed: {exc.code().name}: {exc.details()}") from exc
        return self.response


# -- the nats-py ceiling -------------------------------------------------------------------------


def prediction_batch_payload(items: int, labels: int, seed: int) -> bytes:
    """A PredictionBatch as inference publishes it for one ingest bus batch of the run's texts."""
    rng = random.Random(seed)
    texts = make_texts(seed, 0, items)
    batch = predictions_pb2.PredictionBatch(
        batch_id=str(uuid.uuid4()),
        project_id="pipeline-ceiling",
        model_id=f"replay-hash-d{EMBEDDING_DIM}",
        prompt_hash=f"replay-{labels}",
        predicted_unix_ms=int(time.time() * 1000),
        label_embeddings=[rng.gauss(0, 0.05) for _ in range(labels * EMBEDDING_DIM)],
    )
    for n, text in enumerate(texts):
        p = batch.predictions.add(
            item_id=str(uuid.uuid4()), external_id=external_id(n), text=text, metadata={"desk": DESKS[0]}
        )
        p.probs.extend([1.0 / labels] * labels)
        p.embedding.extend([rng.gauss(0, 0.05) for _ in range(EMBEDDING_DIM)])
    return batch.SerializeToString()


async def measure_ceiling(nats_url: str, messages: int, items_per_message: int, labels: int) -> Ceiling:
    """JetStream publish (pipelined, every ack awaited) and pull fetch of `messages` payloads the
    size of the pipeline's busiest message, on a scratch file stream like the pipeline's."""
    payload = prediction_batch_payload(items_per_message, labels, seed=1)
    nc = await nats.connect(nats_url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        # The window bounds memory and keeps the server's inbound buffer from stalling the socket.
        js = nc.jetstream(publish_async_max_pending=256)
        await js.add_stream(
            StreamConfig(name=SCRATCH_STREAM, subjects=[SCRATCH_SUBJECT], storage=StorageType.FILE)
        )
        try:
            started = time.perf_counter()
            acks = [await js.publish_async(SCRATCH_SUBJECT, payload) for _ in range(messages)]
            await asyncio.gather(*acks)
            publish_s = time.perf_counter() - started
            sub = await js.pull_subscribe(
                SCRATCH_SUBJECT,
                durable="ceiling",
                stream=SCRATCH_STREAM,
                config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=1024),
            )
            got = 0
            # A fetch of ~32 MB at most: the server cuts off a client that falls 64 MB behind
            # (a slow consumer), which a fetch of 256 messages of the larger batches would.
            per_fetch = max(1, min(256, (32 << 20) // len(payload)))
            started = time.perf_counter()
            while got < messages:
                batch = await sub.fetch(min(per_fetch, messages - got), timeout=10)
                for msg in batch:
                    await msg.ack()
                got += len(batch)
            fetch_s = time.perf_counter() - started
        finally:
            await js.delete_stream(SCRATCH_STREAM)
    finally:
        await nc.close()
    return Ceiling(messages, len(payload), items_per_message, messages / publish_s, messages / fetch_s)


# -- sampling ------------------------------------------------------------------------------------


class ProcessGroup:
    """CPU seconds and RSS of one process and (optionally) every descendant of it. CPU of children
    that exited is in the parent's children times once it reaped them, so nothing is lost."""

    def __init__(self, name: str, pid: int, *, children: bool) -> None:
        self.name = name
        self._proc = psutil.Process(pid)
        self._children = children
        self._last: tuple[float, float] | None = None

    def _members(self) -> list[psutil.Process]:
        members = [self._proc]
        if self._children:
            members += self._proc.children(recursive=True)
        return members

    def sample(self) -> tuple[float, int] | None:
        """(% of one CPU since the last call, RSS bytes), or None once the process is gone."""
        cpu, rss = 0.0, 0
        try:
            members = self._members()
        except psutil.Error:
            return None
        for p in members:
            try:
                t = p.cpu_times()
                cpu += t.user + t.system + t.children_user + t.children_system
                rss += p.memory_info().rss
            except psutil.Error:
                continue  # exited between the listing and the read
        now = time.monotonic()
        last, self._last = self._last, (now, cpu)
        if last is None:
            return 0.0, rss
        return max(cpu - last[1], 0.0) / max(now - last[0], 1e-6) * 100.0, rss


def process_groups(stack: Stack) -> list[ProcessGroup]:
    groups = []
    for name, proc in stack.processes.items():
        if proc.pid is not None:
            groups.append(ProcessGroup(name, proc.pid, children=True))
    if stack.postgres is not None and stack.postgres.pid is not None:
        groups.append(ProcessGroup("postgres", stack.postgres.pid, children=True))
    if stack.nats is not None and stack.nats.pid is not None:
        groups.append(ProcessGroup("nats-server", stack.nats.pid, children=False))
    # The services are this process's children: only its own time is the load generator's.
    groups.append(ProcessGroup("loadgen", os.getpid(), children=False))
    return groups


async def scrape(http: httpx.AsyncClient, port: int) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """/metrics as family name → [(sample name, labels, value)]; {} when it cannot be read."""
    try:
        response = await http.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        response.raise_for_status()
    except httpx.HTTPError:
        return {}
    return {
        family.name: [(s.name, dict(s.labels), float(s.value)) for s in family.samples]
        for family in text_string_to_metric_families(response.text)
    }


async def consumer_lag(js: Any) -> dict[str, int]:
    lag: dict[str, int] = {}
    for stream in await js.streams_info():
        name = stream.config.name
        if not name or not name.startswith("TANDEM_"):
            continue  # key-value buckets and the scratch stream
        for info in await js.consumers_info(name):
            lag[info.name] = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
    return lag


def _total(metrics: dict[str, list[tuple[str, dict[str, str], float]]], family: str, **match: str) -> int:
    return int(
        sum(
            v
            for name, labels, v in metrics.get(family, [])
            if name.endswith("_total") and all(labels.get(k) == want for k, want in match.items())
        )
    )


def stage_counts(
    metrics: dict[str, dict[str, list[tuple[str, dict[str, str], float]]]], review: int | None, route: str
) -> dict[str, int]:
    """Items past each stage, from the services' own counters: the project's stats count rows in
    PostgreSQL, a scan of a million rows per call that would load the stack it measures. One project
    runs, so the process-wide counters are the project's."""
    decided = metrics.get("scorer", {}).get("tandem_scorer_decisions", [])
    counts = {
        "ingest": _total(metrics.get("ingest", {}), "tandem_ingest_items", outcome="accepted"),
        "inference": _total(metrics.get("inference", {}), "tandem_inference_items"),
        # Decisions on arrival (refits' acceptances and audits would count items twice).
        "scorer": int(
            sum(
                v
                for name, labels, v in decided
                if name.endswith("_total") and labels.get("outcome") not in ("certified", "audit")
            )
        ),
    }
    if route == "model":
        counts["export"] = _total(metrics.get("export", {}), "tandem_export_final_labels")
    else:
        counts["review"] = review or 0
    return counts


class Sampler:
    def __init__(self, stack: Stack, clients: Clients, project_id: str, route: str) -> None:
        self.stack = stack
        self._clients = clients
        self._project_id = project_id
        self._route = route
        self._groups = process_groups(stack)
        self.samples: list[Sample] = []
        self.t0 = time.monotonic()
        self._review = 0

    async def sample(self, js: Any, http: httpx.AsyncClient) -> Sample:
        names = ("ingest", "inference", "scorer", "export")
        lag, scraped = await asyncio.gather(
            consumer_lag(js),
            asyncio.gather(*(scrape(http, self.stack.processes[n].http_port) for n in names)),
        )
        if self._route == "review":
            # Review's queue depth gauge (open and leased tasks): its stats would count rows.
            depth = (await scrape(http, self.stack.processes["review"].http_port)).get(
                "tandem_review_queue_depth", []
            )
            if depth:
                self._review = int(sum(v for _, lb, v in depth if lb.get("state") in ("open", "leased")))
        cpu: dict[str, float] = {}
        rss: dict[str, int] = {}
        for group in self._groups:
            got = group.sample()
            if got is not None:
                cpu[group.name], rss[group.name] = got
        counts = stage_counts(dict(zip(names, scraped, strict=True)), self._review, self._route)
        s = Sample(time.monotonic() - self.t0, counts, lag, cpu, rss)
        self.samples.append(s)
        return s


# -- latencies from PostgreSQL -------------------------------------------------------------------

# (stage, SQL giving n, last (timestamptz), p50 s, p99 s, what the latency is between)
_PCT = "percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY extract(epoch FROM {}))"
STAGE_SQL: dict[str, tuple[str, str]] = {
    "ingest": (
        "SELECT count(*), max(i.ingested_at), "
        + _PCT.format("i.ingested_at - s.sent_at")
        + " FROM ingest.items i JOIN pg_temp.lt_sent s ON s.b = substr(i.external_id, 4)::bigint / $2"
        " WHERE i.project_id = $1",
        "request sent → ingested_at",
    ),
    "inference": (
        "SELECT count(*), max(p.predicted_at), "
        + _PCT.format("p.predicted_at - i.ingested_at")
        + " FROM export.predictions p JOIN ingest.items i USING (item_id) WHERE p.project_id = $1",
        "ingested_at → predicted_at",
    ),
    "scorer": (
        "SELECT count(*), max(s.decided_at), "
        + _PCT.format("s.decided_at - coalesce(p.predicted_at, s.predicted_at)")
        + " FROM scorer.items s LEFT JOIN export.predictions p USING (item_id) WHERE s.project_id = $1",
        "predicted_at → scorer decided_at",
    ),
    "export": (
        "SELECT count(*), max(f.updated_at), "
        + _PCT.format("f.updated_at - s.decided_at")
        + " FROM export.final_labels f JOIN scorer.items s USING (item_id) WHERE f.project_id = $1",
        "decided_at → final label stored",
    ),
    "review": (
        "SELECT count(DISTINCT t.item_id), max(t.created_at), "
        + _PCT.format("t.created_at - s.decided_at")
        + " FROM review.tasks t JOIN scorer.items s USING (item_id) WHERE t.project_id = $1",
        "decided_at → task created_at",
    ),
    "end to end": (
        "SELECT count(*), max(f.updated_at), "
        + _PCT.format("f.updated_at - i.ingested_at")
        + " FROM export.final_labels f JOIN ingest.items i USING (item_id) WHERE f.project_id = $1",
        "ingested_at → final label stored",
    ),
}


def _stage(name: str, row: asyncpg.Record | None, started_wall: float, what: str) -> StageResult:
    n = int(row[0]) if row is not None else 0
    last: datetime | None = row[1] if row is not None else None
    pct = row[2] if row is not None and row[2] is not None else [math.nan, math.nan]
    seconds = last.timestamp() - started_wall if last is not None else 0.0
    rate = n / seconds if n and seconds > 0 else 0.0
    return StageResult(name, n, rate, pct[0] * 1000, pct[1] * 1000, what)


async def stage_latencies(
    database_url: str, project_id: str, route: str, batch: int, sent_at: list[float], started_wall: float
) -> tuple[list[StageResult], StageResult]:
    names = ["ingest", "inference", "scorer", "export" if route == "model" else "review"]
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("CREATE TEMP TABLE lt_sent (b bigint PRIMARY KEY, sent_at timestamptz NOT NULL)")
        await conn.copy_records_to_table(
            "lt_sent",
            records=[(b, datetime.fromtimestamp(t, tz=UTC)) for b, t in enumerate(sent_at)],
        )
        stages = []
        for name in names:
            sql, what = STAGE_SQL[name]
            args: tuple[object, ...] = (project_id, batch) if name == "ingest" else (project_id,)
            stages.append(_stage(name, await conn.fetchrow(sql, *args), started_wall, what))
        sql, what = STAGE_SQL["end to end"]
        end = _stage("end to end", await conn.fetchrow(sql, project_id), started_wall, what)
    finally:
        await conn.close()
    return stages, end


# -- /metrics at the end -------------------------------------------------------------------------


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """histogram_quantile over cumulative (upper bound, count) buckets, +Inf last."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower  # past the last finite bound: that bound is all that is known
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = upper, count
    return lower


def scorer_figures(metrics: dict[str, list[tuple[str, dict[str, str], float]]]) -> dict[str, float] | None:
    """Refits (count, mean and p50/p99 seconds, excluding the one-time read of the waiting items,
    timed apart), and the waiting items the scorer keeps in memory."""
    samples = metrics.get("tandem_scorer_refit_seconds", [])
    if not samples:
        return None
    count = sum(v for s, _, v in samples if s.endswith("_count"))
    total = sum(v for s, _, v in samples if s.endswith("_sum"))
    buckets = [(float(lb["le"]), v) for s, lb, v in samples if s.endswith("_bucket")]
    load = metrics.get("tandem_scorer_waiting_load_seconds", [])
    loads = sum(v for s, _, v in load if s.endswith("_count"))
    return {
        "count": count,
        "mean_s": total / count if count else 0.0,
        "p50_s": bucket_quantile(0.5, buckets) if count else 0.0,
        "p99_s": bucket_quantile(0.99, buckets) if count else 0.0,
        "waiting_load_s": sum(v for s, _, v in load if s.endswith("_sum")) / loads if loads else 0.0,
        "waiting_items": sum(v for _, _, v in metrics.get("tandem_scorer_waiting_items", [])),
        "waiting_bytes": sum(v for _, _, v in metrics.get("tandem_scorer_waiting_bytes", [])),
    }


async def handler_stats(
    http: httpx.AsyncClient, stack: Stack
) -> tuple[list[HandlerStats], dict[str, float] | None]:
    handlers: list[HandlerStats] = []
    refit: dict[str, float] | None = None
    for proc in stack.processes.values():
        metrics = await scrape(http, proc.http_port)
        sums: dict[tuple[str, str], float] = {}
        buckets: dict[str, list[tuple[float, float]]] = {}
        for family in ("tandem_bus_handler_seconds", "tandem_bus_batch_items"):
            for sample, labels, value in metrics.get(family, []):
                consumer = labels.get("consumer", "")
                if sample.endswith(("_sum", "_count")):
                    key = (consumer, family + sample[sample.rfind("_") :])
                    sums[key] = sums.get(key, 0.0) + value
                elif sample == "tandem_bus_handler_seconds_bucket":
                    buckets.setdefault(consumer, []).append((float(labels["le"]), value))
        for consumer in sorted({c for c, _ in sums}):
            count = sums.get((consumer, "tandem_bus_handler_seconds_count"), 0.0)
            if not count:
                continue
            seconds = sums.get((consumer, "tandem_bus_handler_seconds_sum"), 0.0)
            items = sums.get((consumer, "tandem_bus_batch_items_sum"), 0.0)
            item_msgs = sums.get((consumer, "tandem_bus_batch_items_count"), 0.0)
            b = buckets.get(consumer, [])
            handlers.append(
                HandlerStats(
                    consumer,
                    int(count),
                    seconds / count * 1000,
                    bucket_quantile(0.5, b) * 1000,
                    bucket_quantile(0.99, b) * 1000,
                    items / item_msgs if item_msgs else 0.0,
                )
            )
        if proc.name == "scorer":
            refit = scorer_figures(metrics)
    return handlers, refit


# The consumer whose handler is each stage's hop, for a stage PostgreSQL has no timestamps of.
STAGE_CONSUMERS = {
    "inference": "inference",
    "scorer": "scorer-predictions",
    "export": "export-labels",
    "review": "review-tasks",
}


def with_fallbacks(
    stages: list[StageResult], handlers: list[HandlerStats], last: Sample | None
) -> list[StageResult]:
    """A stage without rows to time (e.g. the export's predictions table missing) gets the count
    it reached and the handler time per message from /metrics instead, said so in the table."""
    by_consumer = {h.consumer: h for h in handlers}
    out = []
    for s in stages:
        h = by_consumer.get(STAGE_CONSUMERS.get(s.stage, ""))
        if s.items == 0 and h is not None and last is not None and last.counts.get(s.stage, 0):
            n = last.counts[s.stage]
            s = StageResult(
                s.stage,
                n,
                n / last.t if last.t > 0 else 0.0,
                h.p50_ms,
                h.p99_ms,
                f"no timestamp: {h.consumer} handler s per message (/metrics)",
            )
        out.append(s)
    return out


# -- the run -------------------------------------------------------------------------------------


def _progress(console: Console, options: PipelineOptions) -> Progress:
    return Progress(
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
        disable=options.quiet,
        transient=False,
    )


def replay_gold(options: PipelineOptions) -> dict[str, str]:
    """External id → the replay labeler's class name of its text: what a simulated person answers."""
    gold = {}
    for lo in range(0, options.items, options.batch):
        hi = min(lo + options.batch, options.items)
        for n, text in zip(range(lo, hi), make_texts(options.seed, lo, hi), strict=True):
            gold[external_id(n)] = f"class-{replay_class(text, options.labels)}"
    return gold


async def label_pool(
    clients: Clients,
    project_id: str,
    options: PipelineOptions,
    sampler: Sampler,
    js: Any,
    http: httpx.AsyncClient,
    deadline: float,
    console: Console,
) -> float:
    """People label `human_labels` items of the waiting pool through review (claim, submit), while
    the scorer refits with the whole pool waiting; sampled as the pipeline was. Returns seconds."""
    with console.status("the replay labeler's classes of the pool, for the simulated people…"):
        gold = await asyncio.to_thread(replay_gold, options)
    workforce = Workforce(
        clients,
        gold,
        WorkforceConfig(
            project_id=project_id,
            annotators=options.annotators,
            error_rate=0.02,
            seconds_per_item=0.0,
            seed=options.seed,
        ),
    )

    review_port = sampler.stack.processes["review"].http_port

    async def enough() -> bool:
        # Review's counter of accepted labels (one project runs); the stats would count rows.
        metrics = await scrape(http, review_port)
        return _total(metrics, "tandem_review_labels") >= options.human_labels

    started = time.monotonic()
    people = asyncio.create_task(workforce.run(enough))
    with console.status(f"{options.annotators} simulated people label {options.human_labels:,} items…"):
        while not people.done() and time.monotonic() < deadline:
            tick = time.monotonic()
            await sampler.sample(js, http)
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
    if not people.done():
        people.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await people
    seconds = time.monotonic() - started
    # The refits the last labels cause (the scorer refits every 10 labels or 2 s).
    for _ in range(5):
        await sampler.sample(js, http)
        await asyncio.sleep(1.0)
    return seconds


async def _drive(
    stack: Stack, options: PipelineOptions, console: Console, deadline: float
) -> tuple[str, Submitter, Sampler, bool, float, float, tuple[list[StageResult], StageResult] | None]:
    project_id = f"load-{uuid.uuid4().hex[:10]}"
    async with Clients(stack.targets, token=stack.admin_token) as clients:
        try:
            await clients.ingest.CreateProject(
                ingest_pb2.CreateProjectRequest(project=project_for(project_id, options)), timeout=30
            )
        except Exception as exc:
            raise LoadTestError(f"CreateProject failed: {exc}") from exc
        submitter = Submitter(clients, project_id, options, deadline)
        sampler = Sampler(stack, clients, project_id, options.route)
        nc = await nats.connect(stack.nats_url, connect_timeout=5)
        http = httpx.AsyncClient()
        submit: asyncio.Task[ingest_pb2.BulkSubmitResponse] | None = None
        labeling = 0.0
        early: tuple[list[StageResult], StageResult] | None = None
        try:
            js = nc.jetstream()
            end_stage = "export" if options.route == "model" else "review"
            with _progress(console, options) as progress:
                bars = {
                    name: progress.add_task(name, total=options.items, rate="")
                    for name in ("ingest", "inference", "scorer", end_stage)
                }
                lag_line = progress.add_task("lag", total=None, rate="")
                submit = asyncio.create_task(submitter.run())
                sampler.t0 = time.monotonic()
                completed = False
                while True:
                    tick = time.monotonic()
                    s = await sampler.sample(js, http)
                    # The rate over the last ~5 s: what each stage does now, not its average so far.
                    back = sampler.samples[max(0, len(sampler.samples) - 6)]
                    for name, bar in bars.items():
                        n = s.counts.get(name, 0)
                        rate = (n - back.counts.get(name, 0)) / (s.t - back.t) if s.t > back.t else 0.0
                        total = (
                            submitter.response.accepted if submitter.response is not None else options.items
                        )
                        progress.update(bar, completed=n, total=total, rate=f"{rate:,.0f}/s")
                    busy = {c: v for c, v in s.lag.items() if v}
                    progress.update(
                        lag_line,
                        description="lag",
                        # The total and the worst consumer: a line per consumer would not fit.
                        rate=(
                            f"{sum(busy.values()):,} msgs, most {max(busy, key=busy.__getitem__)}"
                            if busy
                            else "none"
                        ),
                    )
                    if submit.done():
                        accepted = submit.result().accepted
                        # The end: every accepted item at the last stage and every consumer caught up
                        # (the export's predictions consumer may trail its final labels).
                        if s.counts.get(end_stage, 0) >= accepted and not busy:
                            completed = True
                            break
                    if time.monotonic() >= deadline:
                        break
                    await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
            if not submit.done():
                # The deadline passed mid-ingest: the request generator stops at its next batch.
                await submit
            drained = time.monotonic() - submitter.started
            if options.route == "review" and options.human_labels and completed:
                # Read before people start: their labels move the items' decided_at on.
                early = await stage_latencies(
                    stack.database_url,
                    project_id,
                    options.route,
                    options.batch,
                    submitter.sent_at,
                    submitter.started_wall,
                )
                labeling = await label_pool(
                    clients, project_id, options, sampler, js, http, deadline, console
                )
        finally:
            if submit is not None and not submit.done():
                submit.cancel()
            await http.aclose()
            await nc.close()
    return project_id, submitter, sampler, completed, drained, labeling, early


async def run_pipeline(options: PipelineOptions, console: Console | None = None) -> PipelineResult:
    """Start the stack, measure the ceiling, drive the pipeline, collect the figures, stop."""
    console = console or Console()
    if options.route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}")
    state_dir = options.state_dir or Path(tempfile.mkdtemp(prefix="tandem-pipeline-"))
    stack = Stack(
        state_dir,
        nats_url=options.nats_url,
        database_url=options.database_url,
        services=WITH_PEOPLE if options.human_labels else SERVICES,
        extra_env={"TANDEM_INFERENCE_BACKEND": "replay"},
    )
    try:
        with console.status("starting nats-server, PostgreSQL and the services…"):
            # In a thread: without identity the stack mints the admin token with asyncio.run.
            await asyncio.to_thread(stack.start)
        with console.status(f"nats-py ceiling: {options.ceiling_messages:,} messages…"):
            ceiling = await measure_ceiling(
                stack.nats_url, options.ceiling_messages, min(BUS_BATCH_ITEMS, options.batch), options.labels
            )
        deadline = time.monotonic() + options.duration
        project_id, submitter, sampler, completed, seconds, labeling, early = await _drive(
            stack, options, console, deadline
        )
        async with httpx.AsyncClient() as http:
            handlers, refit = await handler_stats(http, stack)
        with console.status("stopping the services…"):
            # Stopped before the tables are read: after a deadline the pipeline would go on moving
            # items while the stages are counted one after another.
            for proc in reversed(list(stack.processes.values())):
                await asyncio.to_thread(proc.terminate)
        with console.status("latencies from PostgreSQL…"):
            stages, end = early or await stage_latencies(
                stack.database_url,
                project_id,
                options.route,
                options.batch,
                submitter.sent_at,
                submitter.started_wall,
            )
        stages = with_fallbacks(stages, handlers, sampler.samples[-1] if sampler.samples else None)
    finally:
        with console.status("stopping the stack…"):
            await asyncio.to_thread(stack.stop)
        if options.state_dir is None and not options.keep:
            shutil.rmtree(state_dir, ignore_errors=True)
    processes = []
    names = sorted({n for s in sampler.samples for n in s.cpu}, key=_process_order)
    for name in names:
        # The first reading of each group has no interval behind it.
        cpu = [s.cpu[name] for s in sampler.samples[1:] if name in s.cpu]
        rss = [s.rss[name] for s in sampler.samples if name in s.rss]
        processes.append(
            ProcessStats(
                name,
                sum(cpu) / len(cpu) if cpu else 0.0,
                max(cpu, default=0.0),
                max(rss, default=0) / 1e6,
            )
        )
    accepted = submitter.response.accepted if submitter.response is not None else 0
    return PipelineResult(
        route=options.route,
        project_id=project_id,
        items=options.items,
        submitted=submitter.submitted,
        accepted=accepted,
        seconds=seconds,
        completed=completed,
        stages=stages,
        end_to_end=end,
        ceiling=ceiling,
        processes=processes,
        handlers=handlers,
        samples=sampler.samples,
        refit=refit,
        labeling_seconds=labeling,
    )


def _process_order(name: str) -> tuple[int, str]:
    order = (*WITH_PEOPLE, "postgres", "nats-server", "loadgen")
    return (order.index(name) if name in order else len(order), name)


# -- the report ----------------------------------------------------------------------------------


def _ms(v: float, digits: int = 0) -> str:
    return "-" if math.isnan(v) else f"{v:,.{digits}f}"


def print_report(result: PipelineResult, console: Console) -> None:
    state = "completed" if result.completed else "stopped at the deadline"
    console.print(
        f"route {result.route}: {result.accepted:,} of {result.items:,} items accepted "
        f"({result.submitted:,} submitted), {state} after {result.seconds:.1f} s"
    )
    table = Table(
        title="stages (items/s: first submit → the stage's last item)",
        caption="timestamps: ingest.items.ingested_at, export.predictions.predicted_at (inference's "
        "predicted_unix_ms), scorer.items.decided_at, export.final_labels.updated_at, review.tasks.created_at",
    )
    for col in ("stage", "items", "items/s", "p50 ms", "p99 ms", "latency measured"):
        table.add_column(col, justify="left" if col in ("stage", "latency measured") else "right")
    for s in [*result.stages, result.end_to_end]:
        if result.route == "review" and s.stage == "end to end":
            table.add_row("export", "-", "-", "-", "-", "nothing: the items wait in review (route review)")
            continue
        table.add_row(
            s.stage, f"{s.items:,}", f"{s.items_per_s:,.0f}", _ms(s.p50_ms), _ms(s.p99_ms), s.latency
        )
    console.print(table)

    c = result.ceiling
    ceiling = Table(title=f"nats-py ceiling: {c.messages:,} messages of {c.message_bytes / 1024:,.0f} KiB")
    for col in ("", "msgs/s", "items/s", "MB/s"):
        ceiling.add_column(col, justify="left" if not col else "right")
    for what, rate in (
        ("JetStream publish (acked)", c.publish_msgs_per_s),
        ("pull fetch + ack", c.fetch_msgs_per_s),
    ):
        ceiling.add_row(
            what, f"{rate:,.0f}", f"{rate * c.items_per_message:,.0f}", f"{rate * c.message_bytes / 1e6:,.0f}"
        )
    console.print(ceiling)
    if result.route == "model":
        console.print(
            f"end to end {result.end_to_end.items_per_s:,.0f} items/s ÷ ceiling {c.items_per_s:,.0f} items/s "
            f"({c.items_per_message} items per message) = {result.ratio:.1%}"
        )
    else:
        last = result.stages[-1]
        console.print(
            f"to review {last.items_per_s:,.0f} items/s ÷ ceiling {c.items_per_s:,.0f} items/s "
            f"= {last.items_per_s / c.items_per_s if c.items_per_s else 0:.1%}"
        )

    console.print(lag_table(result.samples))

    procs = Table(title="processes (CPU % of one core, with children; RSS summed over them)")
    for col in ("process", "CPU mean %", "CPU peak %", "RSS peak MB"):
        procs.add_column(col, justify="left" if col == "process" else "right")
    for p in result.processes:
        procs.add_row(p.name, f"{p.cpu_mean:,.0f}", f"{p.cpu_peak:,.0f}", f"{p.rss_peak_mb:,.0f}")
    console.print(procs)

    handlers = Table(title="bus handlers (/metrics: tandem_bus_handler_seconds, tandem_bus_batch_items)")
    for col in ("consumer", "messages", "mean ms", "p50 ms", "p99 ms", "items/msg"):
        handlers.add_column(col, justify="left" if col == "consumer" else "right")
    for h in result.handlers:
        handlers.add_row(
            h.consumer,
            f"{h.messages:,}",
            f"{h.mean_ms:,.1f}",
            _ms(h.p50_ms, 1),
            _ms(h.p99_ms, 1),
            f"{h.items_per_message:,.1f}",
        )
    console.print(handlers)
    r = result.refit
    if r is not None:
        console.print(
            f"scorer refits (tandem_scorer_refit_seconds: fit + re-scoring a slice + writes): "
            f"{r['count']:,.0f}, mean {r['mean_s'] * 1000:,.0f} ms, p50 {r['p50_s'] * 1000:,.0f} ms, "
            f"p99 {r['p99_s'] * 1000:,.0f} ms"
            + (
                f", while people labeled for {result.labeling_seconds:,.0f} s"
                if result.labeling_seconds
                else ""
            )
        )
        if r["waiting_items"]:
            console.print(
                f"scorer memory for re-scoring: {r['waiting_items']:,.0f} waiting items in "
                f"{r['waiting_bytes'] / 2**20:,.0f} MiB (read from PostgreSQL in "
                f"{r['waiting_load_s']:,.1f} s when the model started, with the items waiting then)"
            )
    else:
        console.print("scorer refits: no tandem_scorer_refit_seconds in the scorer's /metrics")


def lag_table(samples: list[Sample], rows: int = 10) -> Table:
    """~`rows` samples evenly over the run; a column per consumer that ever lagged."""
    consumers = sorted({c for s in samples for c, v in s.lag.items() if v})
    table = Table(title="consumer lag (pending + ack-pending)" + ("" if consumers else ": none seen"))
    table.add_column("t s", justify="right")
    for c in consumers:
        table.add_column(c, justify="right", overflow="fold")
    if not samples or not consumers:
        return table
    step = max(1, math.ceil(len(samples) / rows))
    picked = samples[::step]
    if picked[-1] is not samples[-1]:
        picked.append(samples[-1])
    for s in picked:
        table.add_row(f"{s.t:.0f}", *(f"{s.lag.get(c, 0):,}" for c in consumers))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=20_000, help="items to submit")
    parser.add_argument("--rate", type=float, default=0.0, help="items/s cap on submission (0 = no cap)")
    parser.add_argument("--duration", type=float, default=3600.0, help="max seconds of ingest + drain")
    parser.add_argument("--labels", type=int, default=4, help="labels of the project")
    parser.add_argument("--batch", type=int, default=500, help="items per BulkSubmit request")
    parser.add_argument("--route", choices=ROUTES, default="model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the texts")
    parser.add_argument("--ceiling-messages", type=int, default=1000, help="messages of the nats-py ceiling")
    parser.add_argument("--state-dir", type=Path, help="kept after the run (logs, database)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary state dir")
    parser.add_argument("--nats-url", help="an external nats-server (JetStream on) instead of a local one")
    parser.add_argument("--database-url", help="an external PostgreSQL database instead of a local one")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument(
        "--human-labels",
        type=int,
        default=0,
        help="route review: simulated people then label this many items (the scorer refits with the pool waiting)",
    )
    parser.add_argument("--annotators", type=int, default=8, help="simulated people of --human-labels")
    args = parser.parse_args()
    if args.items < 1 or args.batch < 1 or args.labels < 2 or args.duration <= 0 or args.rate < 0:
        parser.error("--items and --batch must be >= 1, --labels >= 2, --duration > 0, --rate >= 0")
    if args.ceiling_messages < 1:
        parser.error("--ceiling-messages must be >= 1")
    options = PipelineOptions(
        items=args.items,
        rate=args.rate,
        duration=args.duration,
        labels=args.labels,
        batch=args.batch,
        route=args.route,
        seed=args.seed,
        state_dir=args.state_dir,
        keep=args.keep,
        nats_url=args.nats_url,
        database_url=args.database_url,
        ceiling_messages=args.ceiling_messages,
        human_labels=args.human_labels,
        annotators=args.annotators,
    )
    console = Console()
    console.print(f"load average before the stack starts: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    try:
        result = asyncio.run(run_pipeline(options, console))
    except (StackError, LoadTestError) as exc:
        console.print(f"[red]the load test could not run:[/] {exc}")
        raise SystemExit(1) from None
    print_report(result, console)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_json(), indent=2, default=str), encoding="utf-8")
        console.print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
