"""`tandem dlq list|replay`: read the dead letters in TANDEM_DLQ and send them back.

The worker dead-letters a message by publishing its payload to `tandem.dlq.<consumer>` with
headers that say why (Tandem-Error), where it came from (Tandem-Subject, Tandem-Stream-Seq) and
how often it was tried (Tandem-Deliveries). Reading goes message by message with the stream's
"next by subject" get, so a list is bounded and leaves no consumer behind.

A replay republishes the payload to its original subject, so every consumer of that subject
sees it again (handlers are idempotent), with a Nats-Msg-Id made from the dead letter's sequence:
a replay repeated within the stream's duplicate window (after a crash between publish and delete)
is dropped by JetStream. The dead letter is deleted only after the publish was acknowledged.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import nats
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError
from rich.table import Table

from services.cli.commands import console
from services.cli.stack import LocalNats
from services.common.bus.contracts import DLQ_PREFIX, dlq_subject

DLQ_STREAM = "TANDEM_DLQ"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
NATS_URL_ENV = "TANDEM_NATS_URL"
# The line nats-server logs once it listens; `tandem up` keeps that log in <state>/nats/.
_LISTENING = re.compile(r"Listening for client connections on ([0-9.]+):(\d+)")


class DlqError(RuntimeError):
    """The dead letters cannot be read or replayed (no NATS, an unknown sequence)."""


@dataclass(frozen=True)
class DeadLetter:
    seq: int  # in TANDEM_DLQ
    consumer: str
    subject: str  # the original subject, where a replay goes
    error: str
    deliveries: int | None
    time: datetime | None
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class Replay:
    seq: int
    subject: str
    outcome: str  # replayed | duplicate | would replay | missing | other consumer


def nats_url_for(state_dir: Path, flag: str | None = None) -> str:
    """--nats-url, else $TANDEM_NATS_URL (what the services read), else the server `tandem up`
    started under the state dir, else the default port on this machine."""
    if flag:
        return flag
    if env := os.environ.get(NATS_URL_ENV):
        return env
    try:
        text = LocalNats(state_dir / "nats").log_path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return DEFAULT_NATS_URL
    found = _LISTENING.findall(text)
    if not found:
        return DEFAULT_NATS_URL
    host, port = found[-1]
    return f"nats://{host}:{port}"


def _dead_letter(raw: RawStreamMsg) -> DeadLetter:
    assert raw.seq is not None and raw.subject is not None
    headers = raw.headers or {}
    deliveries = headers.get("Tandem-Deliveries")
    return DeadLetter(
        seq=raw.seq,
        consumer=raw.subject.removeprefix(f"{DLQ_PREFIX}."),
        subject=headers.get("Tandem-Subject", ""),
        error=headers.get("Tandem-Error", ""),
        deliveries=int(deliveries) if deliveries and deliveries.isdigit() else None,
        time=raw.time,
        data=raw.data or b"",
    )


async def scan(js: JetStreamContext, consumer: str | None = None) -> AsyncIterator[DeadLetter]:
    """Dead letters in stream order, one request each, of one consumer or of all."""
    wanted = dlq_subject(consumer) if consumer else f"{DLQ_PREFIX}.>"
    seq = 1
    while True:
        try:
            raw = await js.get_msg(DLQ_STREAM, seq=seq, subject=wanted, next=True)
        except NotFoundError:
            return
        letter = _dead_letter(raw)
        yield letter
        seq = letter.seq + 1


async def list_dead_letters(
    js: JetStreamContext, consumer: str | None = None, limit: int = 100
) -> list[DeadLetter]:
    out: list[DeadLetter] = []
    if limit <= 0:
        return out
    async for letter in scan(js, consumer):
        out.append(letter)
        if len(out) >= limit:
            break
    return out


def replay_msg_id(consumer: str, seq: int) -> str:
    return f"replay:{consumer}:{DLQ_STREAM}:{seq}"


async def replay(
    js: JetStreamContext, consumer: str, seqs: Sequence[int] | None = None, *, dry_run: bool = False
) -> list[Replay]:
    """Send dead letters of `consumer` back to their subjects: the given sequences, or all."""
    letters: list[DeadLetter | Replay] = []
    if seqs is None:
        letters = [letter async for letter in scan(js, consumer)]
    else:
        for seq in seqs:
            try:
                letters.append(_dead_letter(await js.get_msg(DLQ_STREAM, seq=seq)))
            except NotFoundError:
                letters.append(Replay(seq, "", "missing"))
    out: list[Replay] = []
    for letter in letters:
        if isinstance(letter, Replay):
            out.append(letter)
        elif letter.consumer != consumer or not letter.subject:
            out.append(Replay(letter.seq, letter.subject, "other consumer"))
        elif dry_run:
            out.append(Replay(letter.seq, letter.subject, "would replay"))
        else:
            headers = {
                "Nats-Msg-Id": replay_msg_id(consumer, letter.seq),
                "Tandem-Replay-Of": str(letter.seq),
            }
            ack = await js.publish(letter.subject, letter.data, headers=headers)
            # Only now: a failed publish leaves the dead letter where it was.
            await js.delete_msg(DLQ_STREAM, letter.seq)
            out.append(Replay(letter.seq, letter.subject, "duplicate" if ack.duplicate else "replayed"))
    return out


def dead_letters_table(letters: Sequence[DeadLetter]) -> Table:
    table = Table(title=f"{DLQ_STREAM}: {len(letters)} dead letters")
    table.add_column("seq", justify="right")
    table.add_column("consumer")
    table.add_column("subject")
    table.add_column("error", overflow="fold")
    table.add_column("tries", justify="right")
    table.add_column("time (UTC)")
    table.add_column("bytes", justify="right")
    for letter in letters:
        table.add_row(
            str(letter.seq),
            letter.consumer,
            letter.subject,
            letter.error[:200],
            "" if letter.deliveries is None else str(letter.deliveries),
            letter.time.strftime("%Y-%m-%d %H:%M:%S") if letter.time else "",
            f"{letter.size:,}",
        )
    return table


async def _quiet(exc: Exception) -> None:
    # nats-py logs every failed attempt with a traceback; the one error that matters is raised.
    return None


async def _connect(url: str) -> NatsClient:
    try:
        # A command, not a service: two tries, then say so (max_reconnect_attempts=0 is "forever").
        return await nats.connect(
            url, connect_timeout=5, max_reconnect_attempts=1, reconnect_time_wait=0.5, error_cb=_quiet
        )
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        raise DlqError(
            f"cannot reach NATS at {url} ({exc!r}); is `tandem up` running? Otherwise pass --nats-url "
            f"or set {NATS_URL_ENV}"
        ) from exc


async def run(args: argparse.Namespace) -> int:
    """The `tandem dlq` subcommands."""
    nc = await _connect(nats_url_for(args.state_dir, args.nats_url))
    try:
        js = nc.jetstream()
        if args.dlq_command == "list":
            console.print(dead_letters_table(await list_dead_letters(js, args.consumer, args.limit)))
            return 0
        if not args.all and not args.seq:
            raise DlqError("name the dead letters: --seq N (repeatable) or --all")
        done = await replay(js, args.consumer, None if args.all else args.seq, dry_run=args.dry_run)
        for r in done:
            console.print(f"seq {r.seq}: {r.outcome}" + (f" → {r.subject}" if r.subject else ""))
        if not done:
            console.print(f"no dead letters of {args.consumer}")
        return 1 if any(r.outcome in ("missing", "other consumer") for r in done) else 0
    finally:
        await nc.close()


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dlq = sub.add_parser("dlq", help="dead letters: list them, replay them once the cause is fixed")
    dsub = dlq.add_subparsers(dest="dlq_command", required=True)
    dl = dsub.add_parser("list", help="dead letters in stream order, with their error")
    dl.add_argument("--consumer", help="only this consumer's (e.g. inference)")
    dl.add_argument("--limit", type=int, default=100)
    dl.add_argument("--nats-url", help=f"default: ${NATS_URL_ENV}, else the server of `tandem up`")
    dr = dsub.add_parser("replay", help="republish to the original subject, then delete the dead letter")
    dr.add_argument("--consumer", required=True)
    which = dr.add_mutually_exclusive_group()
    which.add_argument(
        "--seq", type=int, action="append", default=[], help="a TANDEM_DLQ sequence (repeatable)"
    )
    which.add_argument("--all", action="store_true", help="every dead letter of the consumer")
    dr.add_argument("--dry-run", action="store_true", help="say what would be replayed, change nothing")
    dr.add_argument("--nats-url", help=f"default: ${NATS_URL_ENV}, else the server of `tandem up`")
