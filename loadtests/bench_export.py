"""Exports of a large project: the snapshot job until ready + StreamExport to a file, timed per format.

    python -m loadtests.bench_export --rows 1000000
    python -m loadtests.bench_export --rows 100000 --formats jsonl,csv,parquet,label-studio
    python -m loadtests.bench_export --rows 1000000 --state-dir /tmp/ex   # kept: the next run reuses the rows

Starts nats-server, PostgreSQL and the export service locally (loopback only) and fills
export.items, export.final_labels and export.raw_labels for one project by COPY (the bus path is
measured elsewhere): news-like texts of ~150 characters with two metadata fields, final labels
from six sources and labels, and `--raw` people's own labels on each labeled-by-people item (a
third of the items). A kept `--state-dir` with the rows already in place skips the fill.

Then, for each format: the snapshot job (CreateExport, then GetExport until ready: the rows written
by PostgreSQL into export.export_rows page by page, and the checksum, one more read) and
StreamExport to a file in the state dir, as `tandem export` does, timed apart. Printed per
format: the two times, rows/s over both, the file size. The goal is >= 100k rows/s end to end and
1M rows in < 60 s. The figures are a report: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.cli.client import channel
from services.cli.stack import Stack
from services.export.formats import FORMATS, SUFFIXES
from services.gen.tandem.export.v1 import export_pb2, export_pb2_grpc

console = Console()
PROJECT = "bench-export"
LABELS = ("business", "entertainment", "politics", "sport", "tech")
SOURCES = ("auto", "human", "consensus", "gold", "model")
RANKS = {"model": 0, "auto": 1, "human": 2, "consensus": 3, "gold": 4}
WORDS = ("market", "election", "match", "film", "chip", "shares", "goal", "vote", "album", "cloud", "growth")
FORMAT_ENUMS = {
    "jsonl": export_pb2.EXPORT_FORMAT_JSONL,
    "csv": export_pb2.EXPORT_FORMAT_CSV,
    "parquet": export_pb2.EXPORT_FORMAT_PARQUET,
    "label-studio": export_pb2.EXPORT_FORMAT_LABEL_STUDIO,
}
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
COPY_BATCH = 50_000


def _item_id(n: int) -> uuid.UUID:
    # Derived from the number, so a refill of a kept state dir finds the same ids.
    return uuid.UUID(int=(0xE << 124) | n)


Records = list[tuple[object, ...]]


def _rows(lo: int, hi: int, raw: int) -> tuple[Records, Records, Records]:
    rng = random.Random(lo)
    items: Records = []
    finals: Records = []
    raws: Records = []
    for n in range(lo, hi):
        item_id = _item_id(n)
        text = " ".join(rng.choice(WORDS) for _ in range(20)) + f" #{n}"
        at = EPOCH + timedelta(seconds=n)
        items.append(
            (item_id, PROJECT, f"ext-{n}", text, json.dumps({"lang": "en", "region": "eu"}), n % 50 == 0, at)
        )
        label = LABELS[n % len(LABELS)]
        people = n % 3 == 0
        source = ("human", "consensus")[n % 2] if people else ("auto", "model", "gold")[n % 3 // 2]
        annotators = [f"ann-{(n + k) % 200}" for k in range(raw)] if people else []
        finals.append(
            (item_id, PROJECT, label, source, RANKS[source], 0.9, "m-1", annotators, at, "majority_vote")
        )
        for k, who in enumerate(annotators):
            raws.append((item_id, PROJECT, f"t-{n}-{k}", who, "north", label, "uncertain", 3.5, at))
    return items, finals, raws


ITEM_COLUMNS = ("item_id", "project_id", "external_id", "text", "metadata", "synthetic", "ingested_at")
FINAL_COLUMNS = (
    "item_id",
    "project_id",
    "label",
    "source",
    "source_rank",
    "confidence",
    "model_version",
    "annotator_ids",
    "finalized_at",
    "method",
)
RAW_COLUMNS = (
    "item_id",
    "project_id",
    "task_id",
    "annotator_id",
    "pool_id",
    "label",
    "reason",
    "seconds_spent",
    "labeled_at",
)


async def _fill(database_url: str, rows: int, raw: int) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        have = await conn.fetchval("SELECT count(*) FROM export.items WHERE project_id = $1", PROJECT)
        if have >= rows:
            console.print(f"project holds {have:,} items already; no fill")
            return
        if have:
            raise SystemExit(
                f"the state dir holds {have:,} items of {rows:,}: remove it or give --rows {have}"
            )
        started = time.monotonic()
        with Progress(
            TextColumn("COPY into export.*"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            bar = progress.add_task("copy", total=rows)
            for lo in range(0, rows, COPY_BATCH):
                hi = min(rows, lo + COPY_BATCH)
                items, finals, raws = await asyncio.to_thread(_rows, lo, hi, raw)
                async with conn.transaction():
                    await conn.copy_records_to_table(
                        "items", schema_name="export", columns=ITEM_COLUMNS, records=items
                    )
                    await conn.copy_records_to_table(
                        "final_labels", schema_name="export", columns=FINAL_COLUMNS, records=finals
                    )
                    await conn.copy_records_to_table(
                        "raw_labels", schema_name="export", columns=RAW_COLUMNS, records=raws
                    )
                progress.update(bar, completed=hi)
        console.print(f"fill by COPY: {rows:,} items in {time.monotonic() - started:.1f} s")
        # What autovacuum would do within a minute, done now so it does not land in the measurement.
        with console.status("VACUUM (ANALYZE)…"):
            for table in ("items", "final_labels", "raw_labels"):
                await conn.execute(f"VACUUM (ANALYZE) export.{table}")
    finally:
        await conn.close()


def _iter_files(out: Path, chunk: export_pb2.ExportChunk) -> Iterator[tuple[Path, bytes]]:
    if chunk.jsonl:
        yield out, chunk.jsonl
    elif chunk.file:
        yield out.with_name(f"{out.stem}.{chunk.file}"), chunk.data


async def _measure(stack: Stack, fmt: str, state_dir: Path) -> tuple[float, float, int, int]:
    out = state_dir / f"export{SUFFIXES[fmt]}"
    async with channel(stack.targets["export"], stack.admin_token) as ch:
        stub = export_pb2_grpc.ExportServiceStub(ch)
        started = time.monotonic()
        info = await stub.CreateExport(
            export_pb2.CreateExportRequest(project_id=PROJECT, format=FORMAT_ENUMS[fmt]), timeout=600
        )
        # CreateExport starts a job and returns at once: the snapshot's time is until it is ready
        # (rows, split, checksum), polled as `tandem export` does.
        while info.state == export_pb2.EXPORT_STATE_BUILDING:
            await asyncio.sleep(0.2)
            info = await stub.GetExport(export_pb2.GetExportRequest(export_id=info.export_id), timeout=30)
        if info.state == export_pb2.EXPORT_STATE_FAILED:
            raise RuntimeError(f"export {info.export_id} failed: {info.error}")
        created = time.monotonic()
        handles: dict[Path, object] = {}
        size = 0
        try:
            async for chunk in stub.StreamExport(
                export_pb2.StreamExportRequest(export_id=info.export_id, file_stem="data"), timeout=3600
            ):
                for path, data in _iter_files(out, chunk):
                    fh = handles.get(path)
                    if fh is None:
                        fh = handles[path] = path.open("wb")
                    fh.write(data)  # type: ignore[attr-defined]
                    size += len(data)
        finally:
            for fh in handles.values():
                fh.close()  # type: ignore[attr-defined]
        streamed = time.monotonic()
    # Snapshots are kept by the service; drop this one so the next format's runs on the same table size.
    conn = await asyncpg.connect(stack.database_url)
    try:
        await conn.execute("DELETE FROM export.exports WHERE export_id = $1", uuid.UUID(info.export_id))
    finally:
        await conn.close()
    return created - started, streamed - created, info.rows, size


async def run(args: argparse.Namespace, state_dir: Path) -> None:
    console.print(f"load average before the stack starts: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    stack = Stack(state_dir, services=("export",))
    try:
        with console.status("starting nats-server, PostgreSQL and export…"):
            # In a thread: without identity the stack mints the admin token with asyncio.run.
            await asyncio.to_thread(stack.start)
        await _fill(stack.database_url, args.rows, args.raw)
        table = Table(title=f"export of {args.rows:,} rows (goal >= 100k rows/s, 1M rows < 60 s)")
        for col in ("format", "create→ready s", "StreamExport s", "total s", "rows/s", "file MB"):
            table.add_column(col, justify="left" if col == "format" else "right")
        for fmt in args.formats:
            with console.status(f"{fmt}: snapshot job + StreamExport…"):
                create_s, stream_s, rows, size = await _measure(stack, fmt, state_dir)
            total = create_s + stream_s
            console.print(
                f"{fmt}: {rows:,} rows, create until ready {create_s:.1f} s, stream {stream_s:.1f} s"
            )
            table.add_row(
                fmt,
                f"{create_s:.1f}",
                f"{stream_s:.1f}",
                f"{total:.1f}",
                f"{rows / total:,.0f}",
                f"{size / 1e6:,.0f}",
            )
        console.print(table)
    finally:
        await asyncio.to_thread(stack.stop)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--raw", type=int, default=2, help="people's own labels per item labeled by people")
    parser.add_argument(
        "--formats",
        type=lambda s: [f.strip() for f in s.split(",")],
        default=["jsonl", "parquet"],
        help=f"comma-separated, of {', '.join(FORMATS)}",
    )
    parser.add_argument("--state-dir", type=Path, help="kept after the run; a second run reuses its rows")
    parser.add_argument("--keep", action="store_true", help="keep the temporary state dir")
    args = parser.parse_args()
    if unknown := set(args.formats) - set(FORMATS):
        parser.error(f"unknown formats {sorted(unknown)}")
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="tandem-bench-export-"))
    try:
        asyncio.run(run(args, state_dir))
    finally:
        if args.state_dir is None and not args.keep:
            shutil.rmtree(state_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
