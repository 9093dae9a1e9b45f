"""The `tandem` commands other than `up` and `demo`."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import IO

import grpc
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.cli.client import Clients
from services.cli.files import InputError, Record, load_project, read_records
from services.cli.views import stats_table, workforce_table
from services.cli.workforce import Workforce, WorkforceConfig
from services.gen.tandem.export.v1 import export_pb2
from services.gen.tandem.ingest.v1 import ingest_pb2
from services.gen.tandem.projects.v1 import projects_pb2
from services.gen.tandem.workforce.v1 import workforce_pb2

# Logs and pipes get wide lines: tables stay readable outside a terminal.
console = Console() if sys.stdout.isatty() else Console(width=180)


async def create_project(clients: Clients, path: Path) -> projects_pb2.Project:
    project = await clients.ingest.CreateProject(
        ingest_pb2.CreateProjectRequest(project=load_project(path)), timeout=30
    )
    console.print(
        f"project [bold]{project.project_id}[/]: {len(project.labels)} labels, "
        f"target accuracy {project.target_accuracy:.2f}, audit rate {project.audit_rate:.2f}"
    )
    return project


async def edit_project(
    clients: Clients,
    project_id: str,
    *,
    name: str | None,
    instructions: str | None,
    hide_suggestions: bool | None,
    budget_items: int | None,
    budget_share: float | None,
    workforce: tuple[projects_pb2.Project, Sequence[str]] | None = None,
) -> None:
    changes = projects_pb2.Project()
    fields: list[str] = []
    if workforce is not None:
        # The workforce options (services/cli/workforce_commands.py) name their own fields.
        changes.MergeFrom(workforce[0])
        fields.extend(workforce[1])
    if name is not None:
        changes.name, fields = name, [*fields, "name"]
    if instructions is not None:
        changes.instructions, fields = instructions, [*fields, "instructions"]
    if hide_suggestions is not None:
        changes.hide_suggestions, fields = hide_suggestions, [*fields, "hide_suggestions"]
    if budget_items is not None:
        changes.human_budget_items, fields = budget_items, [*fields, "human_budget_items"]
    if budget_share is not None:
        changes.human_budget_share, fields = budget_share, [*fields, "human_budget_share"]
    if not fields:
        raise InputError(
            "nothing to change: give --name, --instructions, --[no-]hide-suggestions, a budget "
            "or a workforce option (see `tandem project edit --help`)"
        )
    project = await clients.ingest.UpdateProject(
        ingest_pb2.UpdateProjectRequest(project_id=project_id, changes=changes, fields=fields), timeout=30
    )
    console.print(f"project [bold]{project.project_id}[/]: changed {', '.join(fields)}")


async def list_projects(clients: Clients) -> None:
    response = await clients.ingest.ListProjects(ingest_pb2.ListProjectsRequest(), timeout=30)
    if not response.projects:
        console.print("no projects yet: create one with `tandem project create FILE`")
    for p in response.projects:
        console.print(f"{p.project_id}\t{len(p.labels)} labels\ttarget {p.target_accuracy:.2f}\t{p.name}")


def _request(project_id: str, records: Iterable[Record]) -> ingest_pb2.SubmitBatchRequest:
    return ingest_pb2.SubmitBatchRequest(
        project_id=project_id,
        items=[
            ingest_pb2.RawItem(external_id=r.external_id, text=r.text, metadata=r.metadata) for r in records
        ],
    )


async def ingest_records(
    clients: Clients, project_id: str, records: list[Record], *, batch: int = 250, quiet: bool = False
) -> ingest_pb2.BulkSubmitResponse:
    """Streams the records through BulkSubmit with a progress bar; returns the summary."""
    progress = Progress(
        TextColumn("ingest"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
    )
    task = progress.add_task("ingest", total=len(records))

    async def requests() -> AsyncIterator[ingest_pb2.SubmitBatchRequest]:
        for start in range(0, len(records), batch):
            chunk = records[start : start + batch]
            yield _request(project_id, chunk)
            progress.advance(task, len(chunk))

    with progress:
        response: ingest_pb2.BulkSubmitResponse = await clients.ingest.BulkSubmit(requests(), timeout=3600)
    return response


def print_ingest_summary(response: ingest_pb2.BulkSubmitResponse) -> None:
    console.print(
        f"accepted {response.accepted:,}, duplicates {response.duplicates:,}, rejected {response.rejected:,}"
    )
    for r in response.rejections[:10]:
        console.print(f"  [red]rejected[/] {r.external_id}: {r.reason}")
    if len(response.rejections) > 10:
        console.print(f"  … and {response.rejected - 10:,} more")


async def ingest_file(clients: Clients, project_id: str, path: Path, text_field: str, id_field: str) -> None:
    records = list(read_records(path, text_field=text_field, id_field=id_field))
    print_ingest_summary(await ingest_records(clients, project_id, records))


def load_gold(path: Path, id_field: str = "id", label_field: str = "label") -> dict[str, str]:
    return {
        r.external_id: r.label
        for r in read_records(path, id_field=id_field, label_field=label_field)
        if r.label
    }


async def project_complete(clients: Clients, project_id: str) -> bool:
    s = await clients.stats(project_id)
    return s.ingest.items > 0 and s.export.finalized >= s.ingest.items


async def simulate(clients: Clients, config: WorkforceConfig, gold_path: Path, max_seconds: float) -> None:
    gold = load_gold(gold_path)
    workforce = Workforce(clients, gold, config)
    stop = asyncio.Event()
    started = time.monotonic()

    async def done() -> bool:
        if time.monotonic() - started > max_seconds:
            return True
        return await project_complete(clients, config.project_id)

    with Live(console=console, refresh_per_second=2) as live:

        async def refresh() -> None:
            while not stop.is_set():
                live.update(stats_table(await clients.stats(config.project_id), time.monotonic() - started))
                await asyncio.sleep(1.0)

        refresher = asyncio.create_task(refresh())
        try:
            stats = await workforce.run(done, stop)
        finally:
            stop.set()
            await asyncio.gather(refresher, return_exceptions=True)
    console.print(
        f"{stats.submitted:,} labels submitted by {config.annotators} simulated annotators "
        f"({stats.wrong_on_purpose} wrong on purpose, {stats.no_gold} without gold, {stats.refused} refused)"
    )


async def _workforce(clients: Clients, project_id: str) -> Table | None:
    """The workforce block, for projects that have one (more than one person per item, pools or
    gold questions): the rest see the status as before."""
    project, quality = await asyncio.gather(
        clients.ingest.GetProject(ingest_pb2.GetProjectRequest(project_id=project_id), timeout=10),
        clients.workforce.GetQuality(workforce_pb2.GetQualityRequest(project_id=project_id), timeout=10),
    )
    if project.overlap > 1 or project.max_overlap > 1 or project.pools or quality.gold_items:
        return workforce_table(project, quality)
    return None


# GetQuality reads every label of items several people labeled: `--watch` asks for it this often,
# not on every refresh of the counts.
WORKFORCE_REFRESH_SECONDS = 10.0


async def status(clients: Clients, project_id: str, watch: bool) -> None:
    stats, workforce = await asyncio.gather(clients.stats(project_id), _workforce(clients, project_id))

    def view() -> RenderableType:
        table = stats_table(stats)
        return table if workforce is None else Group(table, workforce)

    if not watch:
        console.print(view())
        return
    fetched = time.monotonic()
    with Live(view(), console=console, refresh_per_second=2) as live:
        while True:
            await asyncio.sleep(1.0)
            stats = await clients.stats(project_id)
            if time.monotonic() - fetched >= WORKFORCE_REFRESH_SECONDS:
                workforce, fetched = await _workforce(clients, project_id), time.monotonic()
            live.update(view())


EXPORT_FORMATS = {
    "jsonl": export_pb2.EXPORT_FORMAT_JSONL,
    "csv": export_pb2.EXPORT_FORMAT_CSV,
    "parquet": export_pb2.EXPORT_FORMAT_PARQUET,
    "label-studio": export_pb2.EXPORT_FORMAT_LABEL_STUDIO,
}
EXPORT_SUFFIXES = {"jsonl": ".jsonl", "csv": ".csv", "parquet": ".parquet", "label-studio": ".json"}
CARD_FILE = "README.md"  # the name the service gives the Parquet dataset card


EXPORT_STATES = {
    export_pb2.EXPORT_STATE_BUILDING: "building",
    export_pb2.EXPORT_STATE_READY: "ready",
    export_pb2.EXPORT_STATE_FAILED: "failed",
}
EXPORT_POLL_SECONDS = 0.2


async def export(
    clients: Clients,
    project_id: str,
    out: Path | None,
    fmt: str = "jsonl",
    split: export_pb2.Split | None = None,
    keep: export_pb2.ExportFilter | None = None,
) -> tuple[export_pb2.ExportInfo, Path]:
    """Export to `out` (or a dated file under exports/); returns the first data file written."""
    info, paths = await export_files(clients, project_id, out, fmt, split, keep)
    return info, paths[0]


async def wait_for_export(
    clients: Clients, info: export_pb2.ExportInfo, *, show: bool = True
) -> export_pb2.ExportInfo:
    """The export once its job has ended, with a progress bar of the rows copied meanwhile."""
    with Progress(
        TextColumn("[bold]export v{task.fields[version]}[/] building"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not show,
    ) as bar:
        task = bar.add_task("export", total=info.rows_total or None, version=info.version)
        while info.state == export_pb2.EXPORT_STATE_BUILDING:
            await asyncio.sleep(EXPORT_POLL_SECONDS)
            info = await clients.export.GetExport(
                export_pb2.GetExportRequest(export_id=info.export_id), timeout=30
            )
            bar.update(task, completed=info.rows_done, total=info.rows_total or None)
    if info.state == export_pb2.EXPORT_STATE_FAILED:
        raise RuntimeError(f"export {info.export_id} (version {info.version}) failed: {info.error}")
    return info


async def export_files(
    clients: Clients,
    project_id: str,
    out: Path | None,
    fmt: str = "jsonl",
    split: export_pb2.Split | None = None,
    keep: export_pb2.ExportFilter | None = None,
) -> tuple[export_pb2.ExportInfo, list[Path]]:
    """Create an export (only the rows `keep` keeps) and stream it to files: `out` itself, except
    for Parquet with a split (`<stem>-<split>.parquet` beside it); Parquet's dataset card goes to
    `<out>.README.md`. Also writes the scorer's certificate beside the first file. A JSONL file is
    checked against the snapshot's checksum."""
    info = await clients.export.CreateExport(
        export_pb2.CreateExportRequest(
            project_id=project_id, format=EXPORT_FORMATS[fmt], split=split, filter=keep
        ),
        timeout=600,
    )
    if info.state == export_pb2.EXPORT_STATE_BUILDING:
        info = await wait_for_export(clients, info)
    suffix = EXPORT_SUFFIXES[fmt]
    path = out or Path("exports") / f"{project_id}-{time.strftime('%Y%m%d-%H%M%S')}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    # The service names Parquet files <stem>.parquet / <stem>-<split>.parquet and the card refers
    # to them so; other formats stream one file, written to `path` whatever its name.
    stem = path.name.removesuffix(suffix) if fmt == "parquet" else path.stem
    handles: dict[str, IO[bytes]] = {}
    digests: dict[str, hashlib._Hash] = {}
    paths: list[Path] = []
    written = 0
    try:
        async for chunk in clients.export.StreamExport(
            export_pb2.StreamExportRequest(export_id=info.export_id, file_stem=stem), timeout=3600
        ):
            if chunk.sha256:
                # The service's digest of every byte it sent for the file, checked against ours.
                if chunk.sha256 != digests[chunk.file].hexdigest():
                    raise RuntimeError(f"export {info.export_id}: {chunk.file or path.name} arrived damaged")
                continue
            if fmt == "jsonl":
                chunk_file, data = "", chunk.jsonl
                written += data.count(b"\n")
            else:
                chunk_file, data = chunk.file, chunk.data
                written += chunk.rows
            fh = handles.get(chunk_file)
            if fh is None:
                target = _export_target(path, chunk_file, fmt)
                fh = handles[chunk_file] = target.open("wb")
                paths.append(target)
            fh.write(data)
            digests.setdefault(chunk_file, hashlib.sha256()).update(data)
    finally:
        for fh in handles.values():
            fh.close()
    if written != info.rows:
        raise RuntimeError(f"export {info.export_id}: expected {info.rows} rows, received {written}")
    # JSONL is the canonical content the checksum is of: equal checksums, equal data.
    if fmt == "jsonl" and info.checksum:
        got = digests.get("", hashlib.sha256()).hexdigest()
        if got != info.checksum:
            raise RuntimeError(
                f"export {info.export_id}: the file's SHA-256 {got} is not the snapshot's {info.checksum}"
            )
    if not paths:  # an empty JSONL export still leaves its (empty) file
        path.touch()
        paths.append(path)
    data_paths = [p for p in paths if not p.name.endswith(CARD_FILE)] or paths
    await write_certificate(clients, project_id, certificate_path(data_paths[0]))
    return info, data_paths + [p for p in paths if p not in data_paths]


async def list_exports(clients: Clients, project_id: str, limit: int = 50) -> None:
    listed = await clients.export.ListExports(
        export_pb2.ListExportsRequest(project_id=project_id, limit=limit), timeout=30
    )
    table = Table(title=f"exports of {project_id}", header_style="bold")
    for col in ("version", "id", "format", "state", "rows", "created", "expires", "checksum"):
        table.add_column(col, justify="right" if col in ("version", "rows") else "left")
    names = {enum: name for name, enum in EXPORT_FORMATS.items()}
    for e in listed.exports:
        state = EXPORT_STATES.get(e.state, "?")
        if e.state == export_pb2.EXPORT_STATE_BUILDING:
            state += f" {e.rows_done:,}/{e.rows_total:,}"
        elif e.state == export_pb2.EXPORT_STATE_FAILED:
            state += f": {e.error}"
        table.add_row(
            str(e.version),
            e.export_id,
            names.get(e.format, "jsonl"),
            state,
            f"{e.rows:,}",
            _when(e.created_unix_ms),
            _when(e.expires_unix_ms) if e.expires_unix_ms else "never",
            e.checksum[:12],
        )
    console.print(table)


def _when(unix_ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(unix_ms / 1000)) if unix_ms else ""


def _export_target(path: Path, chunk_file: str, fmt: str) -> Path:
    if fmt != "parquet":
        return path
    if chunk_file == CARD_FILE:
        return path.with_name(path.name + "." + CARD_FILE)
    # A plain name from the service; anything else would let it write outside the folder.
    if Path(chunk_file).name != chunk_file or chunk_file in ("", ".", ".."):
        raise RuntimeError(f"export stream names an unexpected file {chunk_file!r}")
    return path.with_name(chunk_file)


def certificate_path(export_path: Path) -> Path:
    return export_path.with_name(export_path.stem + ".certificate.json")


async def write_certificate(clients: Clients, project_id: str, path: Path) -> dict[str, object]:
    """What the scorer certifies about the exported labels, beside the export: the certified lower
    bound and its delta, the estimate, audits and human share (also when the target is not met)."""
    sc = (await clients.stats(project_id)).scorer
    doc: dict[str, object] = {
        "project_id": project_id,
        "guarantee": sc.guarantee,
        "target_accuracy": sc.target_accuracy,
        "certified_accuracy": sc.certified_accuracy,
        "delta": sc.certificate_delta,
        "certified": sc.certified,
        "estimated_accuracy": sc.estimated_accuracy,
        "audits": sc.audited,
        "audit_disagreements": sc.audit_disagreements,
        "human_share": sc.human_share,
        "human_error_assumed": sc.human_error_assumed,
        "human_labels_checked": sc.human_labels_checked,
        "human_errors_upper": sc.human_errors_upper,
        "automatic_labels": sc.auto_accepted,
        "model_labels_below_target": sc.below_target,
    }
    await asyncio.to_thread(path.write_text, json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return doc


def describe_rpc_error(exc: grpc.aio.AioRpcError) -> str:
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        return "cannot reach the service: is the stack running (`tandem up`)? " + (exc.details() or "")
    return f"{exc.code().name}: {exc.details()}"
