"""The annotator's path over HTTP: many people labeling one project through the web app.

    python -m loadtests.annotator_http --annotators 50 --seconds 60 --think-seconds 1.0
    python -m loadtests.annotator_http --annotators 50 --seconds 30 --think-seconds 0   # saturation

Starts nats-server, PostgreSQL, identity, ingest, review and the web app locally (loopback
only), creates one project and one annotator user per simulated person, and puts review tasks
straight on the bus (the scorer and the labeler are not what is measured here). Each simulated
annotator logs in through the login form like a browser (login CSRF cookie, session cookie),
opens the labeling screen for its CSRF token, then loops: `POST /api/projects/P/next` → think →
`POST /api/tasks/T/submit` (think times drawn per item, starts staggered). It prints p50/p95/p99 latency of next, submit and the pair (the
time a person waits per item), labels/s, failures, and the CPU seconds of each process.
A think time of ~1 s is a fast person (one decision per second, as in a binary task); 0 is a
closed loop at full pressure, which measures the ceiling rather than a person's wait.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import nats
from rich.console import Console
from rich.table import Table

from loadtests.measure import Timings, cpu_seconds, pct
from services.cli.client import Clients
from services.cli.stack import Stack
from services.cli.targets import DEFAULT_PORTS
from services.common.bus.contracts import Subject
from services.gen.tandem.identity.v1 import identity_pb2
from services.gen.tandem.ingest.v1 import ingest_pb2
from services.gen.tandem.projects.v1 import projects_pb2
from services.gen.tandem.tasks.v1 import tasks_pb2

console = Console()
PROJECT = "bench-http"
LABELS = ("positive", "negative")
PASSWORD = "bench-password-123"
_HIDDEN_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
_META_CSRF = re.compile(r'<meta name="csrf-token" content="([^"]+)"')


async def _set_up(stack: Stack, annotators: int, tasks: int) -> None:
    # Scorer, inference and export do not run here; their stubs are never called.
    targets = {**{name: stack.targets["ingest"] for name in DEFAULT_PORTS}, **stack.targets}
    async with Clients(targets, token=stack.admin_token) as admin:
        project = projects_pb2.Project(
            project_id=PROJECT,
            name="HTTP benchmark",
            instructions="Is the sentence positive or negative?",
            labels=[projects_pb2.LabelDef(name=n, description=f"The sentence is {n}.") for n in LABELS],
        )
        await admin.ingest.CreateProject(ingest_pb2.CreateProjectRequest(project=project), timeout=30)
        for i in range(annotators):
            await admin.identity.CreateUser(
                identity_pb2.CreateUserRequest(
                    user_id=f"ann-{i:03d}",
                    role=identity_pb2.ROLE_ANNOTATOR,
                    password=PASSWORD,
                    project_ids=[PROJECT],
                ),
                timeout=30,
            )
    nc = await nats.connect(stack.nats_url)
    try:
        js = nc.jetstream()
        for start in range(0, tasks, 500):
            batch = tasks_pb2.ReviewTaskBatch(
                batch_id=str(uuid.uuid4()),
                tasks=[
                    tasks_pb2.ReviewTask(
                        item_id=str(uuid.uuid4()),
                        project_id=PROJECT,
                        external_id=f"item-{n}",
                        text=f"Sentence number {n}: the service was quick and the staff were friendly.",
                        suggested_label=LABELS[n % 2],
                        confidence=0.6,
                        priority=1.0 - n / tasks,
                    )
                    for n in range(start, min(tasks, start + 500))
                ],
            )
            await js.publish(str(Subject.TASKS_REVIEW_REQUESTED), batch.SerializeToString())
    finally:
        await nc.close()


async def _log_in(http: aiohttp.ClientSession, base: str, user_id: str) -> str:
    async with http.get(f"{base}/login") as page:
        match = _HIDDEN_CSRF.search(await page.text())
    if match is None:
        raise RuntimeError("no CSRF field on the login page")
    form = {"user_id": user_id, "password": PASSWORD, "csrf": match.group(1), "next": "/"}
    async with http.post(f"{base}/login", data=form, allow_redirects=False) as answer:
        if answer.status != 303:
            raise RuntimeError(f"login of {user_id} answered {answer.status}")
    async with http.get(f"{base}/projects/{PROJECT}/label") as screen:
        meta = _META_CSRF.search(await screen.text())
    if meta is None:
        raise RuntimeError("no CSRF token on the labeling screen")
    return meta.group(1)


def _browser() -> aiohttp.ClientSession:
    # unsafe=True: the jar keeps cookies of an IP address (127.0.0.1), as a browser does.
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def _annotator(
    http: aiohttp.ClientSession, base: str, csrf: str, deadline: float, think: float, t: Timings
) -> None:
    headers = {"X-CSRF-Token": csrf}
    # People do not work in lockstep: each starts at a random moment of the first think time and
    # takes between half and one and a half of it per item (a fixed time would send all of them
    # in one wave, which measures a queue no real team forms).
    rng = random.Random(csrf)
    await asyncio.sleep(rng.uniform(0, think))
    while time.monotonic() < deadline:
        began = time.perf_counter()
        async with http.post(f"{base}/api/projects/{PROJECT}/next", json={}, headers=headers) as r:
            body = await r.json() if r.status == 200 else None
        t.next_ms.append((time.perf_counter() - began) * 1000)
        if body is None:
            t.fail(f"next {r.status}")
            continue
        task = body.get("task")
        if not task:
            t.empty += 1
            await asyncio.sleep(0.2)
            continue
        if think:
            await asyncio.sleep(think * rng.uniform(0.5, 1.5))
        began = time.perf_counter()
        payload = {"label": LABELS[0], "lease_id": task["lease_id"], "seconds_spent": think}
        async with http.post(
            f"{base}/api/tasks/{task['task_id']}/submit", json=payload, headers=headers
        ) as r:
            await r.read()
        t.submit_ms.append((time.perf_counter() - began) * 1000)
        if r.status != 200:
            t.fail(f"submit {r.status}")


async def run(annotators: int, seconds: float, think: float, tasks: int, state_dir: Path) -> None:
    stack = Stack(state_dir, services=("identity", "ingest", "review", "web"))
    with console.status("starting nats-server, PostgreSQL, identity, ingest, review and the web app…"):
        await asyncio.to_thread(stack.start)
    try:
        with console.status(f"creating {annotators} annotators and {tasks:,} tasks…"):
            await _set_up(stack, annotators, tasks)
            await asyncio.sleep(2.0)  # the review consumer stores the tasks
        browsers = [_browser() for _ in range(annotators)]
        try:
            # Logging in (argon2, memory-hard on purpose) happens before the measured window.
            with console.status(f"{annotators} annotators logging in through the login form…"):
                tokens = [await _log_in(b, stack.web_url, f"ann-{i:03d}") for i, b in enumerate(browsers)]
            pids = {name: proc.pid for name, proc in stack.processes.items()}
            cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            timings = Timings()
            deadline = time.monotonic() + seconds
            started = time.monotonic()
            with console.status(f"{annotators} annotators labeling for {seconds:.0f} s (think {think} s)…"):
                await asyncio.gather(
                    *(
                        _annotator(b, stack.web_url, csrf, deadline, think, timings)
                        for b, csrf in zip(browsers, tokens, strict=True)
                    )
                )
            wall = time.monotonic() - started
            cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
        finally:
            for b in browsers:
                await b.close()
    finally:
        await asyncio.to_thread(stack.stop)
    pairs = [a + b for a, b in zip(timings.next_ms, timings.submit_ms, strict=False)]
    table = Table(title=f"annotator path over HTTP: {annotators} annotators, think {think} s, {wall:.0f} s")
    for col in ("call", "n", "p50 ms", "p95 ms", "p99 ms", "max ms"):
        table.add_column(col, justify="right" if col != "call" else "left")
    for name, values in (
        ("next task", timings.next_ms),
        ("submit", timings.submit_ms),
        ("next + submit", pairs),
    ):
        table.add_row(
            name,
            f"{len(values):,}",
            f"{pct(values, 0.50):.1f}",
            f"{pct(values, 0.95):.1f}",
            f"{pct(values, 0.99):.1f}",
            f"{max(values, default=float('nan')):.1f}",
        )
    console.print(table)
    labels = len(timings.submit_ms)
    console.print(
        f"labels submitted: {labels:,} ({labels / wall:.1f}/s); empty queue answers: {timings.empty:,}; "
        f"failures: {timings.failures or 'none'}; mean next+submit {statistics.fmean(pairs) if pairs else 0:.1f} ms"
    )
    console.print("CPU seconds during the run: " + ", ".join(f"{n} {c:.1f}" for n, c in cpu.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotators", type=int, default=50)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument(
        "--think-seconds", type=float, default=1.0, help="a person's time per item (0: full pressure)"
    )
    p.add_argument("--tasks", type=int, default=0, help="tasks to queue (default: enough for the run)")
    p.add_argument("--state-dir", type=Path, help="default: a temporary directory, removed afterwards")
    args = p.parse_args()
    if args.annotators < 1 or args.seconds <= 0 or args.think_seconds < 0:
        p.error("annotators ≥ 1, seconds > 0 and think-seconds ≥ 0 please")
    per_second = args.annotators / max(args.think_seconds, 0.02)
    tasks = args.tasks or int(min(200_000, per_second * args.seconds * 1.2 + 1000))
    if args.state_dir is not None:
        asyncio.run(run(args.annotators, args.seconds, args.think_seconds, tasks, args.state_dir))
        return
    with tempfile.TemporaryDirectory(prefix="tandem-bench-http-") as tmp:
        asyncio.run(run(args.annotators, args.seconds, args.think_seconds, tasks, Path(tmp)))


if __name__ == "__main__":
    main()
