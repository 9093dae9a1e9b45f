"""`tandem pool|annotator|gold|quality`, and the workforce options of `tandem project edit`.

Pools, people's pools and skills, pauses, gold questions and the quality figures all live in the
review service (WorkforceService); a project's workforce settings live on the project (ingest's
UpdateProject). PutPool and PutAnnotator replace a whole record, so the commands read the record
first and change only what an option names: `tandem annotator set ann --skill language=de` keeps
ann's pool.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.cli.client import Clients
from services.cli.commands import console
from services.cli.files import InputError
from services.cli.views import age, method_name, rate
from services.common.gold import GOLD_PER_CALL, gold_item
from services.gen.tandem.ingest.v1 import ingest_pb2
from services.gen.tandem.projects.v1 import projects_pb2
from services.gen.tandem.workforce.v1 import workforce_pb2

# What AddGold takes per call, and the longest gold text it keeps (services/review/workforce.py).
MAX_SHOWN_PROBLEMS = 20
SHOWN_KAPPAS = 10

# --- pools ----------------------------------------------------------------------------------------


async def _pools(clients: Clients) -> dict[str, workforce_pb2.Pool]:
    listed = await clients.workforce.ListPools(workforce_pb2.ListPoolsRequest(), timeout=30)
    return {p.pool_id: p for p in listed.pools}


async def add_pool(
    clients: Clients, pool_id: str, *, name: str | None, max_leased: int | None, vendor: str | None
) -> None:
    """Create a pool, or change the options given of one that exists."""
    current = (await _pools(clients)).get(pool_id)
    pool = workforce_pb2.Pool(pool_id=pool_id)
    if current is not None:
        pool.CopyFrom(current)
    if name is not None:
        pool.name = name
    if max_leased is not None:
        pool.max_leased = max_leased
    if vendor is not None:
        pool.vendor_user_id = vendor
    saved = await clients.workforce.PutPool(pool, timeout=30)
    verb = "changed" if current is not None else "created"
    limit = f"at most {saved.max_leased} leased" if saved.max_leased else "no lease limit"
    vendor_part = f", vendor account {saved.vendor_user_id}" if saved.vendor_user_id else ""
    console.print(f"pool [bold]{saved.pool_id}[/] {verb}: {saved.name or '-'}, {limit}{vendor_part}")


async def list_pools(clients: Clients) -> None:
    pools = await _pools(clients)
    if not pools:
        console.print("no pools yet: create one with `tandem pool add POOL_ID`")
        return
    people = await clients.workforce.ListAnnotators(workforce_pb2.ListAnnotatorsRequest(), timeout=30)
    counts: dict[str, int] = {}
    for a in people.annotators:
        counts[a.pool_id] = counts.get(a.pool_id, 0) + 1
    table = Table(title="pools", header_style="bold")
    for column in ("pool", "name", "people", "max leased", "vendor account"):
        table.add_column(column, justify="right" if column in ("people", "max leased") else "left")
    for p in pools.values():
        table.add_row(
            p.pool_id,
            p.name or "-",
            str(counts.get(p.pool_id, 0)),
            str(p.max_leased) if p.max_leased else "no limit",
            p.vendor_user_id or "-",
        )
    console.print(table)


# --- annotators -----------------------------------------------------------------------------------


async def set_annotator(
    clients: Clients,
    user_id: str,
    *,
    pool: str | None,
    skills: Sequence[str] | None,
    max_leased: int | None,
) -> None:
    """Put a person in a pool (`--pool ''`: none), give their skills, cap their leases; what no
    option names stays as it is."""
    listed = await clients.workforce.ListAnnotators(workforce_pb2.ListAnnotatorsRequest(), timeout=30)
    current = next((a for a in listed.annotators if a.annotator_id == user_id), None)
    person = workforce_pb2.Annotator(annotator_id=user_id)
    if current is not None:
        person.CopyFrom(current)
        del person.paused_projects[:]  # read only: the service takes pauses from SetPaused
    if pool is not None:
        person.pool_id = pool
    if skills is not None:
        bad = [s for s in skills if "=" not in s or not s.partition("=")[0] or not s.partition("=")[2]]
        if bad:
            raise InputError(f"skills are field=value (e.g. language=de), not {', '.join(map(repr, bad))}")
        person.skills[:] = list(dict.fromkeys(skills))
    if max_leased is not None:
        person.max_leased = max_leased
    saved = await clients.workforce.PutAnnotator(person, timeout=30)
    console.print(
        f"annotator [bold]{saved.annotator_id}[/]: pool {saved.pool_id or '-'}, "
        f"skills {', '.join(saved.skills) or '-'}, "
        f"max leased {saved.max_leased or 'the service default'}"
    )


async def list_annotators(clients: Clients, pool: str) -> None:
    listed = await clients.workforce.ListAnnotators(
        workforce_pb2.ListAnnotatorsRequest(pool_id=pool), timeout=30
    )
    if not listed.annotators:
        where = f" in pool {pool}" if pool else ""
        console.print(f"no annotators{where} yet: add one with `tandem annotator set USER_ID --pool POOL`")
        return
    table = Table(title=f"annotators in pool {pool}" if pool else "annotators", header_style="bold")
    for column in ("annotator", "pool", "skills", "max leased", "paused on"):
        table.add_column(column, justify="right" if column == "max leased" else "left")
    for a in listed.annotators:
        table.add_row(
            a.annotator_id,
            a.pool_id or "-",
            ", ".join(a.skills) or "-",
            str(a.max_leased) if a.max_leased else "default",
            ", ".join(a.paused_projects) or "-",
        )
    console.print(table)


async def set_paused(clients: Clients, project_id: str, user_id: str, paused: bool, reason: str) -> None:
    await clients.workforce.SetPaused(
        workforce_pb2.SetPausedRequest(
            project_id=project_id, annotator_id=user_id, paused=paused, reason=reason
        ),
        timeout=30,
    )
    if paused:
        console.print(f"{user_id} is paused on {project_id}: {reason or 'paused by a manager'}")
    else:
        console.print(f"{user_id} may work on {project_id} again")


# --- gold -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GoldRows:
    items: list[workforce_pb2.GoldItem]
    problems: list[str]  # "file:line: what is wrong", one per row left out


def _gold_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line, row or what is wrong with the line) for a JSONL or CSV file."""
    try:
        fh = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    with fh:
        try:
            if path.suffix.lower() == ".csv":
                reader = csv.DictReader(fh)
                start = 2
                for row in reader:
                    yield start, dict(row)
                    start = reader.line_num + 1
                return
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    parsed = json.loads(line)
                except ValueError as exc:
                    yield lineno, f"not valid JSON: {exc}"
                    continue
                yield lineno, parsed if isinstance(parsed, dict) else "each line must be a JSON object"
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: not UTF-8 text ({exc})") from exc


def read_gold(path: Path, labels: Sequence[str]) -> GoldRows:
    items: list[workforce_pb2.GoldItem] = []
    problems: list[str] = []
    where: dict[str, int] = {}
    for lineno, row in _gold_rows(path):
        checked = gold_item(row, labels) if isinstance(row, dict) else row
        if isinstance(checked, str):
            problems.append(f"{path.name}:{lineno}: {checked}")
        elif checked.external_id in where:
            problems.append(
                f"{path.name}:{lineno}: {checked.external_id}: the same id as line {where[checked.external_id]}"
            )
        else:
            where[checked.external_id] = lineno
            items.append(checked)
    return GoldRows(items, problems)


async def add_gold(clients: Clients, project_id: str, path: Path) -> None:
    """Gold questions from a JSONL or CSV file (id, text, label), sent GOLD_PER_CALL at a time.
    Bad rows are listed with their line and left out; the others are sent."""
    project = await clients.ingest.GetProject(ingest_pb2.GetProjectRequest(project_id=project_id), timeout=30)
    rows = read_gold(path, [lb.name for lb in project.labels])
    for problem in rows.problems[:MAX_SHOWN_PROBLEMS]:
        console.print(f"  [red]left out[/] {problem}", soft_wrap=True)
    if len(rows.problems) > MAX_SHOWN_PROBLEMS:
        console.print(f"  … and {len(rows.problems) - MAX_SHOWN_PROBLEMS:,} more rows left out")
    if not rows.items:
        raise InputError(f"{path}: no usable gold rows (each needs id, text and a label of the project)")
    progress = Progress(
        TextColumn("gold"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )
    task = progress.add_task("gold", total=len(rows.items))
    added, total = 0, 0
    with progress:
        for start in range(0, len(rows.items), GOLD_PER_CALL):
            chunk = rows.items[start : start + GOLD_PER_CALL]
            answer = await clients.workforce.AddGold(
                workforce_pb2.AddGoldRequest(project_id=project_id, items=chunk), timeout=60
            )
            added, total = added + answer.added, answer.total
            progress.advance(task, len(chunk))
    console.print(
        f"added {added:,} gold questions to [bold]{project_id}[/] ({total:,} in all); "
        f"{len(rows.problems):,} rows left out"
    )


# --- quality --------------------------------------------------------------------------------------


def quality_tables(q: workforce_pb2.Quality) -> Group:
    """Everything GetQuality says, as tables: people, pools, agreement."""
    people = Table(title=f"annotators on {q.project_id}", header_style="bold")
    for column in ("annotator", "pool", "labels", "gold accuracy", "agreement", "leased", "paused"):
        people.add_column(column, justify="right" if column in ("labels", "leased") else "left")
    for a in sorted(q.annotators, key=lambda a: a.annotator_id):
        people.add_row(
            a.annotator_id,
            a.pool_id or "-",
            f"{a.labels:,}",
            rate(a.gold_accuracy),
            rate(a.consensus_agreement),
            str(a.leased),
            f"[red]paused[/]: {a.paused_reason}" if a.paused else "-",
        )
    if not q.annotators:
        people.add_row("[dim]no one has worked on this project yet[/]", *[""] * 6)
    pools = Table(title="pools", header_style="bold")
    for column in ("pool", "people", "labels", "gold accuracy", "agreement", "open", "leased", "oldest open"):
        pools.add_column(
            column, justify="left" if column in ("pool", "gold accuracy", "agreement") else "right"
        )
    for p in q.pools:
        pools.add_row(
            p.pool_id or "(no pool)",
            str(p.annotators),
            f"{p.labels:,}",
            rate(p.gold_accuracy),
            rate(p.consensus_agreement),
            f"{p.open:,}",
            f"{p.leased:,}",
            age(p.oldest_open_seconds) if p.open else "-",
        )
    parts: list[Any] = [people]
    if q.pools:
        parts.append(pools)
    alpha = "-" if math.isnan(q.krippendorff_alpha) else f"{q.krippendorff_alpha:.3f}"
    parts.append(
        f"consensus: {method_name(q.method)} on {q.consensus_items:,} items; "
        f"Krippendorff's α {alpha}; {q.gold_items:,} gold questions"
    )
    if q.kappas:
        kappas = Table(title="pairs that agree least (Cohen's κ)", header_style="bold")
        for column in ("annotator", "annotator", "κ", "items"):
            kappas.add_column(column, justify="right" if column in ("κ", "items") else "left")
        for k in sorted(q.kappas, key=lambda k: k.kappa)[:SHOWN_KAPPAS]:
            kappas.add_row(k.a, k.b, f"{k.kappa:.3f}", f"{k.items:,}")
        parts.append(kappas)
    return Group(*parts)


async def quality(clients: Clients, project_id: str) -> None:
    q = await clients.workforce.GetQuality(workforce_pb2.GetQualityRequest(project_id=project_id), timeout=30)
    console.print(quality_tables(q))


# --- project settings -----------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkforceEdit:
    """The workforce options of `tandem project edit`; None = not given."""

    pools: Sequence[str] | None = None
    no_pools: bool = False
    skill_fields: Sequence[str] | None = None
    no_skill_fields: bool = False
    overlap: int | None = None
    max_overlap: int | None = None
    overlap_below_confidence: float | None = None
    sla_seconds: float | None = None
    gold_first: int | None = None
    gold_first_share: float | None = None
    gold_share: float | None = None
    quality_bar: float | None = None


def pool_shares(specs: Sequence[str]) -> list[projects_pb2.PoolShare]:
    """`POOL=SHARE` (or `POOL`, share 1) → PoolShare; the ingest service checks ids and shares."""
    out: list[projects_pb2.PoolShare] = []
    for spec in specs:
        pool_id, eq, share_text = spec.partition("=")
        try:
            share = float(share_text) if eq else 1.0
        except ValueError as exc:
            raise InputError(f"--pool takes POOL=SHARE with a number for SHARE, not {spec!r}") from exc
        if not pool_id.strip():
            raise InputError(f"--pool takes POOL=SHARE, not {spec!r}")
        out.append(projects_pb2.PoolShare(pool_id=pool_id.strip(), share=share))
    return out


NUMBERS = (
    "overlap",
    "max_overlap",
    "overlap_below_confidence",
    "sla_seconds",
    "gold_first",
    "gold_first_share",
    "gold_share",
    "quality_bar",
)


def workforce_changes(edit: WorkforceEdit) -> tuple[projects_pb2.Project, list[str]]:
    """The project fields the options name, for UpdateProject."""
    changes = projects_pb2.Project()
    fields: list[str] = []
    if edit.no_pools and edit.pools:
        raise InputError("give --pool or --no-pools, not both")
    if edit.no_pools or edit.pools:
        changes.pools.extend(pool_shares(edit.pools or ()))
        fields.append("pools")
    if edit.no_skill_fields and edit.skill_fields:
        raise InputError("give --skill-field or --no-skill-fields, not both")
    if edit.no_skill_fields or edit.skill_fields:
        changes.skill_fields.extend(dict.fromkeys(f.strip() for f in edit.skill_fields or ()))
        fields.append("skill_fields")
    for name in NUMBERS:
        value = getattr(edit, name)
        if value is not None:
            setattr(changes, name, value)
            fields.append(name)
    return changes, fields


def edit_of(args: argparse.Namespace) -> WorkforceEdit:
    return WorkforceEdit(
        pools=args.pool,
        no_pools=args.no_pools,
        skill_fields=args.skill_field,
        no_skill_fields=args.no_skill_fields,
        overlap=args.overlap,
        max_overlap=args.max_overlap,
        overlap_below_confidence=args.overlap_below_confidence,
        sla_seconds=args.sla_seconds,
        gold_first=args.gold_first,
        gold_first_share=args.gold_first_share,
        gold_share=args.gold_share,
        quality_bar=args.quality_bar,
    )


# --- the command line -----------------------------------------------------------------------------

COMMANDS = ("pool", "annotator", "gold", "quality")


def add_edit_options(edit: argparse.ArgumentParser) -> None:
    """The workforce options of `tandem project edit`; each one given goes into UpdateProject."""
    g = edit.add_argument_group("workforce (see docs/workforce.md)")
    g.add_argument("--pool", action="append", metavar="POOL=SHARE", help="a pool and its share (repeatable)")
    g.add_argument("--no-pools", action="store_true", help="no pools: anyone in the project may label")
    g.add_argument(
        "--skill-field",
        action="append",
        metavar="FIELD",
        help="item metadata field people need as a skill (repeatable)",
    )
    g.add_argument("--no-skill-fields", action="store_true", help="no skills needed")
    g.add_argument("--overlap", type=int, metavar="N", help="people per item")
    g.add_argument(
        "--max-overlap", type=int, metavar="N", help="one more person while labels disagree, up to N"
    )
    g.add_argument(
        "--overlap-below-confidence",
        type=float,
        metavar="X",
        help="start at max overlap below this model confidence",
    )
    g.add_argument(
        "--sla-seconds", type=float, metavar="S", help="items waiting longer go first, to anyone allowed"
    )
    g.add_argument(
        "--gold-first", type=int, metavar="N", help="a person's first N tasks get the higher gold share"
    )
    g.add_argument("--gold-first-share", type=float, metavar="X", help="gold share among the first N tasks")
    g.add_argument("--gold-share", type=float, metavar="X", help="gold share afterwards")
    g.add_argument(
        "--quality-bar", type=float, metavar="X", help="pause people whose gold accuracy is below this"
    )


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pool = sub.add_parser("pool", help="pools of annotators (managers, admins)")
    psub = pool.add_subparsers(dest="pool_command", required=True)
    pa = psub.add_parser("add", help="create a pool, or change the options given of one")
    pa.add_argument("pool_id")
    pa.add_argument("--name")
    pa.add_argument(
        "--max-leased", type=int, metavar="N", help="leased tasks across the pool at once (0: no limit)"
    )
    pa.add_argument(
        "--vendor", metavar="USER_ID", help="the vendor account that labels for the pool's workers"
    )
    psub.add_parser("list", help="list pools")

    ann = sub.add_parser("annotator", help="people's pools, skills and pauses")
    asub = ann.add_subparsers(dest="annotator_command", required=True)
    aset = asub.add_parser("set", help="a person's pool, skills and lease limit (what is not given stays)")
    aset.add_argument("user")
    aset.add_argument("--pool", help="the person's pool ('' for none)")
    aset.add_argument(
        "--skill", action="append", metavar="FIELD=VALUE", help="a skill (repeatable; replaces the list)"
    )
    aset.add_argument("--no-skills", action="store_true", help="clear the person's skills")
    aset.add_argument(
        "--max-leased", type=int, metavar="N", help="leased tasks at once (0: the service default)"
    )
    al = asub.add_parser("list", help="list annotators")
    al.add_argument("--pool", default="")
    for verb in ("pause", "resume"):
        ap = asub.add_parser(verb, help=f"{verb} a person on a project")
        ap.add_argument("user")
        ap.add_argument("--project", required=True)
        if verb == "pause":
            ap.add_argument("--reason", default="")

    gold = sub.add_parser("gold", help="gold questions (known answers that measure people)")
    gsub = gold.add_subparsers(dest="gold_command", required=True)
    ga = gsub.add_parser("add", help="add gold questions from JSONL or CSV with id, text, label")
    ga.add_argument("file", type=Path)
    ga.add_argument("--project", required=True)

    q = sub.add_parser("quality", help="annotators' gold accuracy and agreement, pools' queues, α and κ")
    q.add_argument("--project", required=True)


def run(args: argparse.Namespace, clients: Clients) -> Coroutine[Any, Any, None]:
    if args.command == "pool":
        if args.pool_command == "add":
            return add_pool(
                clients, args.pool_id, name=args.name, max_leased=args.max_leased, vendor=args.vendor
            )
        return list_pools(clients)
    if args.command == "annotator":
        if args.annotator_command == "set":
            if args.no_skills and args.skill:
                raise InputError("give --skill or --no-skills, not both")
            return set_annotator(
                clients,
                args.user,
                pool=args.pool,
                skills=[] if args.no_skills else args.skill,
                max_leased=args.max_leased,
            )
        if args.annotator_command == "list":
            return list_annotators(clients, args.pool)
        paused = args.annotator_command == "pause"
        return set_paused(clients, args.project, args.user, paused, args.reason if paused else "")
    if args.command == "gold":
        return add_gold(clients, args.project, args.file)
    return quality(clients, args.project)
