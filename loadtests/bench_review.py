"""The review queue under load: claim and submit over gRPC with a deep queue in one project.

    python -m loadtests.bench_review --tasks 1000000 --annotators 200
    python -m loadtests.bench_review --tasks 100000 --annotators 50 --seconds 30
    python -m loadtests.bench_review --tasks 1000000 --state-dir /tmp/rq   # kept: the next run reuses the queue
    python -m loadtests.bench_review --tasks 1000000 --fill-direct         # COPY instead of the bus

Starts nats-server, PostgreSQL, identity, ingest and review locally (loopback only), creates one
project and one annotator per simulated person (a token-only user with an API token, so no
password hashing), and fills the project with `--tasks` open review tasks. By default the tasks
travel the real path: `ReviewTaskBatch` messages of `--batch` tasks on the bus, stored by the
review service's consumer (the scorer that would send them is not run); the fill rate printed is
publish to stored, end to end. `--fill-direct` COPYs the rows into review.tasks instead, for when
the consumer path is too slow to wait for. Item ids and priorities are derived from the item's
number, so a fill that is interrupted, or a second run on a kept `--state-dir`, only tops the
queue up to `--tasks` open tasks. The servers always stop at the end (also on Ctrl-C); the state
dir is removed unless it was given or `--keep` is set.

After the fill, review.tasks is vacuumed and analyzed (what autovacuum would do within a minute,
done now so that it does not land in the measured window) unless `--no-vacuum`. Then each
annotator runs a closed loop, NextTask → `--think-ms` → SubmitLabel with one of the project's
labels, for `--warmup` seconds (not counted) and then `--seconds`. Each annotator sends its own
token; about 20 share one gRPC connection. With no think time the loops keep the service
saturated, so latency is mostly waiting in line (annotators / throughput, Little's law): it shows
the ceiling. A person's pace (`--think-ms 2000` and up) shows the wait people would see.

Printed: p50/p95/p99/max of NextTask and SubmitLabel as the client sees them (calls started in
the measured window), claims/s and labels/s, empty-queue answers and failures by status code,
the queue (open/leased/done) before the warm-up and at the end, and the CPU seconds each process
used in the measured window (PostgreSQL with all its backends, nats-server, the services, this
load generator). The figures are a report: nothing is asserted.

Not measured: the scorer and the web app (see annotator_http.py for the browser's path), TLS,
the network (everything is on 127.0.0.1), and the outbox's labels downstream (no consumer
reads them here; the review service still writes and publishes them). The load generator runs
on the same machine and its CPU is shown, as it competes with the service and the database.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import nats
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from loadtests.measure import Timings, cpu_seconds, pct
from services.cli.client import channel
from services.cli.stack import Stack, log_tail
from services.common.bus.contracts import Subject
from services.gen.tandem.identity.v1 import identity_pb2, identity_pb2_grpc
from services.gen.tandem.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from services.gen.tandem.projects.v1 import projects_pb2
from services.gen.tandem.review.v1 import review_pb2, review_pb2_grpc
from services.gen.tandem.stats.v1 import stats_pb2, stats_pb2_grpc
from services.gen.tandem.tasks.v1 import tasks_pb2

console = Console()
PROJECT = "bench-review"
LABELS = ("positive", "negative")
ANNOTATORS_PER_CHANNEL = 20
CALL_TIMEOUT = 30.0  # seconds; a call that takes longer counts as failed (DEADLINE_EXCEEDED)
# Item ids are derived from this and the item's number, so a refill never duplicates an item.
ITEM_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, f"tandem:loadtests:{PROJECT}")
WORDS = ("service", "staff", "delivery", "price", "screen", "battery", "room", "refund", "driver")
MOODS = ("quick", "slow", "friendly", "rude", "fine", "broken", "great", "late")
# What --fill-direct writes; columns added by later migrations take their defaults.
TASK_COLUMNS = ["task_id", "item_id", "project_id", "external_id", "text", "suggested_label"]
TASK_COLUMNS += ["confidence", "reason", "priority", "synthetic", "round", "state"]


@dataclass(frozen=True)
class Synthetic:
    """Item number n as the scorer would have sent it."""

    n: int

    @property
    def item_id(self) -> uuid.UUID:
        return uuid.uuid5(ITEM_NAMESPACE, str(self.n))

    @property
    def text(self) -> str:
        n = self.n
        return f"Order {n}: the {WORDS[n % len(WORDS)]} was {MOODS[(n // 7) % len(MOODS)]}."

    def priority(self, item_id: uuid.UUID) -> float:
        # Spread like a model's uncertainty, but the same on every refill of the same item.
        return int.from_bytes(item_id.bytes[8:], "big") / 2**64

    def message(self) -> tasks_pb2.ReviewTask:
        item = self.item_id
        p = self.priority(item)
        return tasks_pb2.ReviewTask(
            item_id=str(item),
            project_id=PROJECT,
            external_id=f"item-{self.n}",
            text=self.text,
            suggested_label=LABELS[self.n % 2],
            confidence=0.5 + 0.5 * p,
            reason="uncertain",
            priority=p,
        )

    def row(self) -> tuple[object, ...]:
        item = self.item_id
        # The review service's own id of an item's first task (round 0, slot 0), as its consumer
        # derives it; COPY skips what the consumer also does (withdrawals, skills: none here).
        task = uuid.uuid5(uuid.NAMESPACE_URL, f"task:{item}")
        p = self.priority(item)
        return (
            task,
            item,
            PROJECT,
            f"item-{self.n}",
            self.text,
            LABELS[self.n % 2],
            0.5 + 0.5 * p,
            "uncertain",
            p,
            False,
            0,
            "open",
        )


def _cpu_snapshot(stack: Stack) -> dict[str, float]:
    out = {
        "postgres (all backends)": cpu_seconds(
            stack.postgres.pid if stack.postgres else None, with_children=True
        ),
        "nats-server": cpu_seconds(stack.nats.pid if stack.nats else None),
    }
    out.update({name: cpu_seconds(proc.pid) for name, proc in stack.processes.items()})
    own = os.times()
    out["load generator (this)"] = own.user + own.system
    return out


async def _review_stats(stats: stats_pb2_grpc.StatsServiceAsyncStub) -> stats_pb2.ReviewStats:
    answer = await stats.GetProjectStats(stats_pb2.GetProjectStatsRequest(project_id=PROJECT), timeout=60)
    return answer.review


def _total(r: stats_pb2.ReviewStats) -> int:
    return r.open + r.leased + r.done + r.withdrawn


async def _set_up(stack: Stack, annotators: int) -> list[str]:
    """The project and one annotator per simulated person; their API tokens."""
    ingest_channel = channel(stack.targets["ingest"], stack.admin_token)
    identity_channel = channel(stack.targets["identity"], stack.admin_token)
    try:
        ingest = ingest_pb2_grpc.IngestServiceStub(ingest_channel)
        identity = identity_pb2_grpc.IdentityServiceStub(identity_channel)
        project = projects_pb2.Project(
            project_id=PROJECT,
            name="Review queue benchmark",
            instructions="Is the sentence positive or negative?",
            labels=[projects_pb2.LabelDef(name=n, description=f"The sentence is {n}.") for n in LABELS],
        )
        try:
            await ingest.CreateProject(ingest_pb2.CreateProjectRequest(project=project), timeout=30)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:  # a kept state dir
                raise

        async def annotator(i: int) -> str:
            user_id = f"ann-{i:04d}"
            try:
                # No password: API tokens only, so setting up 200 people costs no argon2 hashing.
                await identity.CreateUser(
                    identity_pb2.CreateUserRequest(
                        user_id=user_id, role=identity_pb2.ROLE_ANNOTATOR, project_ids=[PROJECT]
                    ),
                    timeout=30,
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise
            made = await identity.CreateToken(
                identity_pb2.CreateTokenRequest(user_id=user_id, name="bench-review", ttl_seconds=86400),
                timeout=30,
            )
            return made.token

        tokens: list[str] = []
        for start in range(0, annotators, 20):
            tokens += await asyncio.gather(*(annotator(i) for i in range(start, min(annotators, start + 20))))
        return tokens
    finally:
        await ingest_channel.close(None)
        await identity_channel.close(None)


async def _fill_bus(
    stack: Stack,
    stats: stats_pb2_grpc.StatsServiceAsyncStub,
    first: int,
    count: int,
    target_open: int,
    batch: int,
) -> None:
    """Publish items first … first+count-1 and wait until the review service holds target_open
    open tasks."""
    nc = await nats.connect(stack.nats_url)
    window = asyncio.Semaphore(16)  # publishes awaiting their ack: the bus is fed, not flooded
    published = 0
    started = time.monotonic()
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
    )
    try:
        js = nc.jetstream()
        with progress:
            sent_bar = progress.add_task("published", total=count, rate="")
            stored_bar = progress.add_task("stored (open)", total=target_open, rate="")

            async def publish(lo: int, hi: int) -> None:
                nonlocal published
                try:
                    message = tasks_pb2.ReviewTaskBatch(
                        batch_id=f"bench:{lo}:{hi}",
                        project_id=PROJECT,
                        tasks=[Synthetic(n).message() for n in range(lo, hi)],
                    )
                    # The batch id as Nats-Msg-Id: a refill inside the dedupe window is dropped.
                    await js.publish(
                        str(Subject.TASKS_REVIEW_REQUESTED),
                        message.SerializeToString(),
                        headers={"Nats-Msg-Id": message.batch_id},
                    )
                    published += hi - lo
                    elapsed = time.monotonic() - started
                    progress.update(sent_bar, completed=published, rate=f"{published / elapsed:,.0f}/s")
                finally:
                    window.release()

            async def publish_all() -> None:
                pending: list[asyncio.Task[None]] = []
                for lo in range(first, first + count, batch):
                    await window.acquire()
                    pending.append(asyncio.create_task(publish(lo, min(first + count, lo + batch))))
                await asyncio.gather(*pending)

            sender = asyncio.create_task(publish_all())
            best, best_at = -1, time.monotonic()
            while True:
                await asyncio.sleep(2.0)
                if sender.done():
                    sender.result()  # a failed publish ends the fill here
                review = await _review_stats(stats)
                elapsed = time.monotonic() - started
                progress.update(
                    stored_bar,
                    completed=min(review.open, target_open),
                    rate=f"{max(review.open - (target_open - count), 0) / elapsed:,.0f}/s",
                )
                if review.open >= target_open and sender.done():
                    break
                if review.open > best:
                    best, best_at = review.open, time.monotonic()
                elif time.monotonic() - best_at > 120:
                    raise RuntimeError(
                        f"the review service stored nothing for 120 s (open {review.open:,}):\n"
                        + log_tail(stack.processes["review"].log_path)
                    )
    finally:
        await nc.close()
    elapsed = time.monotonic() - started
    console.print(
        f"fill over the bus: {count:,} tasks in {elapsed:.1f} s = {count / elapsed:,.0f} tasks/s "
        f"(publish to stored; batches of {batch:,})"
    )


async def _fill_direct(stack: Stack, first: int, count: int) -> None:
    conn = await asyncpg.connect(stack.database_url)
    started = time.monotonic()
    chunk = 50_000

    def rows(lo: int, hi: int) -> Iterator[tuple[object, ...]]:
        return (Synthetic(n).row() for n in range(lo, hi))

    try:
        with Progress(
            TextColumn("COPY into review.tasks"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            bar = progress.add_task("copy", total=count)
            for lo in range(first, first + count, chunk):
                hi = min(first + count, lo + chunk)
                await conn.copy_records_to_table(
                    "tasks", schema_name="review", columns=TASK_COLUMNS, records=rows(lo, hi)
                )
                progress.update(bar, completed=hi - first)
    finally:
        await conn.close()
    elapsed = time.monotonic() - started
    console.print(f"fill by COPY: {count:,} tasks in {elapsed:.1f} s = {count / elapsed:,.0f} tasks/s")


async def _settle(stack: Stack) -> None:
    conn = await asyncpg.connect(stack.database_url)
    try:
        started = time.monotonic()
        await conn.execute("VACUUM (ANALYZE) review.tasks")
        await conn.execute("CHECKPOINT")
        console.print(f"VACUUM (ANALYZE) review.tasks and CHECKPOINT: {time.monotonic() - started:.1f} s")
    finally:
        await conn.close()


async def _annotator(
    stub: review_pb2_grpc.ReviewServiceAsyncStub,
    token: str,
    measure_from: float,
    deadline: float,
    think: float,
    t: Timings,
) -> None:
    metadata = (("authorization", f"Bearer {token}"),)
    rng = random.Random(token)
    request = review_pb2.NextTaskRequest(project_id=PROJECT)
    while time.monotonic() < deadline:
        began = time.monotonic()
        counted = began >= measure_from
        try:
            task = await stub.NextTask(request, metadata=metadata, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                t.empty += counted
            elif counted:
                t.fail(f"NextTask {exc.code().name}")
            await asyncio.sleep(0.05)  # an empty queue or an error is not retried in a hot loop
            continue
        if counted:
            t.next_ms.append((time.monotonic() - began) * 1000)
        if think:
            await asyncio.sleep(think * rng.uniform(0.5, 1.5))
        label = rng.choice(list(task.labels) or list(LABELS))
        began = time.monotonic()
        counted = began >= measure_from
        try:
            await stub.SubmitLabel(
                review_pb2.SubmitLabelRequest(
                    task_id=task.task_id, lease_id=task.lease_id, label=label, seconds_spent=think
                ),
                metadata=metadata,
                timeout=CALL_TIMEOUT,
            )
        except grpc.aio.AioRpcError as exc:
            if counted:
                t.fail(f"SubmitLabel {exc.code().name}")
            continue
        if counted:
            t.submit_ms.append((time.monotonic() - began) * 1000)


async def _load(
    stack: Stack, tokens: list[str], warmup: float, seconds: float, think: float
) -> tuple[Timings, dict[str, float], float]:
    # No retry policy (unlike the CLI's channels): a failure is counted, not hidden in latency.
    # A local subchannel pool gives every channel its own connection (grpc shares them otherwise).
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.insecure_channel(stack.targets["review"], options=options)
        for _ in range(0, len(tokens), ANNOTATORS_PER_CHANNEL)
    ]
    stubs = [review_pb2_grpc.ReviewServiceStub(ch) for ch in channels]
    timings = Timings()
    start = time.monotonic()
    measure_from, deadline = start + warmup, start + warmup + seconds
    loops = asyncio.gather(
        *(
            _annotator(stubs[i // ANNOTATORS_PER_CHANNEL], token, measure_from, deadline, think, timings)
            for i, token in enumerate(tokens)
        )
    )
    try:
        with console.status(f"{len(tokens)} annotators: warm-up {warmup:.0f} s…"):
            await asyncio.sleep(max(measure_from - time.monotonic(), 0))
        cpu_before = _cpu_snapshot(stack)
        with console.status(
            f"{len(tokens)} annotators: measuring for {seconds:.0f} s (think {think:.3f} s)…"
        ):
            await asyncio.sleep(max(deadline - time.monotonic(), 0))
            cpu_after = _cpu_snapshot(stack)
            await loops  # the calls in flight at the deadline finish (they started inside the window)
    finally:
        # On Ctrl-C the loops are cancelled here, and their outcome collected so none is left unread.
        loops.cancel()
        await asyncio.gather(loops, return_exceptions=True)
        await asyncio.gather(*(ch.close(None) for ch in channels))
    cpu = {name: cpu_after[name] - cpu_before[name] for name in cpu_after}
    return timings, cpu, seconds


def _report(
    args: argparse.Namespace,
    timings: Timings,
    cpu: dict[str, float],
    wall: float,
    before: stats_pb2.ReviewStats,
    after: stats_pb2.ReviewStats,
) -> None:
    table = Table(
        title=f"review queue: {before.open:,} open tasks, {args.annotators} annotators, "
        f"think {args.think_ms:.0f} ms, {wall:.0f} s measured"
    )
    for col in ("call", "answered", "failed", "per s", "p50 ms", "p95 ms", "p99 ms", "max ms"):
        table.add_column(col, justify="left" if col == "call" else "right")
    for name, values in (("NextTask", timings.next_ms), ("SubmitLabel", timings.submit_ms)):
        # Latencies are of answered calls only; a call past its deadline shows up as failed.
        failed = sum(n for what, n in timings.failures.items() if what.startswith(f"{name} "))
        table.add_row(
            name,
            f"{len(values):,}",
            f"{failed:,}",
            f"{len(values) / wall:,.1f}",
            f"{pct(values, 0.50):.1f}",
            f"{pct(values, 0.95):.1f}",
            f"{pct(values, 0.99):.1f}",
            f"{max(values, default=float('nan')):.1f}",
        )
    console.print(table)
    p99 = pct(timings.next_ms, 0.99)
    console.print(
        f"claims/s {len(timings.next_ms) / wall:,.1f}, labels/s {len(timings.submit_ms) / wall:,.1f}; "
        f"empty-queue answers {timings.empty:,}; failures: {timings.failures or 'none'}"
    )
    console.print(
        f"queue open/leased/done: before {before.open:,}/{before.leased:,}/{before.done:,}, "
        f"after {after.open:,}/{after.leased:,}/{after.done:,}"
    )
    console.print(
        f"NextTask p99 {p99:.1f} ms against the goal of < 20 ms at 1M open tasks "
        f"({'within' if p99 < 20 else 'above'} it on this run)"
    )
    load1, _, _ = os.getloadavg()  # the stack's own load included
    cpu_table = Table(
        title=f"CPU seconds in the {wall:.0f} s measured ({os.cpu_count()} CPUs, load average {load1:.1f})"
    )
    cpu_table.add_column("process")
    cpu_table.add_column("CPU s", justify="right")
    cpu_table.add_column("cores busy", justify="right")
    for name, seconds in cpu.items():
        cpu_table.add_row(name, f"{seconds:.1f}", f"{seconds / wall:.2f}")
    console.print(cpu_table)


async def run(args: argparse.Namespace, state_dir: Path) -> None:
    # Anything already busy on this machine competes with the stack: the figures are only as quiet as it is.
    console.print(f"load average before the stack starts: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    stack = Stack(state_dir, services=("identity", "ingest", "review"))
    try:
        # Started in this thread: a Ctrl-C meanwhile cancels the run once the stack is up, and the
        # finally below stops it (a start in a worker thread would race that stop).
        with console.status("starting nats-server, PostgreSQL, identity, ingest and review…"):
            stack.start()
        console.print(f"state: {state_dir}")
        await _measure(args, stack)
    finally:
        await asyncio.to_thread(stack.stop)


async def _measure(args: argparse.Namespace, stack: Stack) -> None:
    stats_channel = channel(stack.targets["review"], stack.admin_token)
    try:
        stats = stats_pb2_grpc.StatsServiceStub(stats_channel)
        with console.status(f"creating the project and {args.annotators} annotators with tokens…"):
            tokens = await _set_up(stack, args.annotators)
        review = await _review_stats(stats)
        missing = args.tasks - review.open
        if missing > 0:
            # New items get the numbers after every task stored so far (open, leased, done).
            first = _total(review)
            console.print(f"queue holds {review.open:,} open tasks; adding {missing:,}")
            if args.fill_direct:
                await _fill_direct(stack, first, missing)
            else:
                await _fill_bus(stack, stats, first, missing, args.tasks, args.batch)
        else:
            console.print(f"queue already holds {review.open:,} open tasks; no fill")
        if not args.no_vacuum:
            with console.status("VACUUM (ANALYZE) review.tasks…"):
                await _settle(stack)
        before = await _review_stats(stats)
        timings, cpu, wall = await _load(stack, tokens, args.warmup, args.seconds, args.think_ms / 1000)
        after = await _review_stats(stats)
        _report(args, timings, cpu, wall, before, after)
    finally:
        await stats_channel.close(None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--tasks", type=int, default=1_000_000, help="open tasks in the queue when the load starts"
    )
    p.add_argument("--annotators", type=int, default=200)
    p.add_argument("--seconds", type=float, default=60.0, help="measured window")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of load before the window")
    p.add_argument("--think-ms", type=float, default=0.0, help="mean pause between claim and submit")
    p.add_argument("--batch", type=int, default=1000, help="tasks per ReviewTaskBatch message")
    p.add_argument("--fill-direct", action="store_true", help="COPY rows into review.tasks, not the bus")
    p.add_argument("--no-vacuum", action="store_true", help="measure right after the fill")
    p.add_argument("--state-dir", type=Path, help="default: a temporary directory")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the state dir (a later run with --state-dir reuses the filled queue)",
    )
    args = p.parse_args()
    if args.tasks < 0 or args.annotators < 1 or args.seconds <= 0 or args.warmup < 0 or args.think_ms < 0:
        p.error("tasks ≥ 0, annotators ≥ 1, seconds > 0, warmup ≥ 0 and think-ms ≥ 0 please")
    if not 1 <= args.batch <= 5000:
        p.error("batch must be in [1, 5000] (a message must stay under the bus's 1 MB)")
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="tandem-bench-review-"))
    try:
        asyncio.run(run(args, state_dir))
    except KeyboardInterrupt:
        console.print("interrupted; the stack is stopped")
        raise SystemExit(130) from None
    finally:
        if args.keep or args.state_dir is not None:
            console.print(f"kept {state_dir}")
        else:
            shutil.rmtree(state_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
