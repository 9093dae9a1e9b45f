"""Publish-after-commit through a transactional outbox.

A handler writes its effects and the messages they cause in one transaction
(`enqueue`). The relay publishes committed rows with their deterministic `Nats-Msg-Id`, then
deletes them. A crash between commit and publish leaves the rows in place and the next relay
pass (this process or another replica: rows are claimed with SKIP LOCKED) sends them; JetStream's
duplicate window and idempotent consumers absorb a row published twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
from google.protobuf.message import Message
from nats.js import JetStreamContext

from services.common.bus.contracts import subject_for
from services.common.metrics import OUTBOX_PUBLISHED

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outgoing:
    msg_id: str
    message: Message


async def enqueue(conn: asyncpg.Connection, schema: str, outgoing: Sequence[Outgoing]) -> None:
    """Add messages to the outbox inside the caller's transaction."""
    if not outgoing:
        return
    await conn.executemany(
        f"INSERT INTO {schema}.outbox (subject, msg_id, payload) VALUES ($1, $2, $3)",
        [(str(subject_for(o.message)), o.msg_id, o.message.SerializeToString()) for o in outgoing],
    )


class OutboxRelay:
    def __init__(
        self, pool: asyncpg.Pool, js: JetStreamContext, schema: str, *, sweep_seconds: float = 1.0
    ) -> None:
        self._pool = pool
        self._js = js
        self._schema = schema
        self._sweep_seconds = sweep_seconds
        self._wake = asyncio.Event()

    def notify(self) -> None:
        """Call after a commit that enqueued messages: publish now rather than at the next sweep."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            # Cleared before the pass, not after: a notify() from a commit the pass did not see
            # must wake the next one instead of waiting out the sweep.
            self._wake.clear()
            try:
                while await self.publish_pending() > 0:
                    pass
            except Exception:
                log.exception("outbox relay pass failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._sweep_seconds)
        await self.publish_pending()  # flush what the drain committed

    async def publish_pending(self, limit: int = 500) -> int:
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                f"SELECT id, subject, msg_id, payload FROM {self._schema}.outbox "
                "ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                limit,
            )
            if not rows:
                return 0
            acks = [
                await self._js.publish_async(
                    row["subject"], bytes(row["payload"]), headers={"Nats-Msg-Id": row["msg_id"]}
                )
                for row in rows
            ]
            await asyncio.wait_for(asyncio.gather(*acks), timeout=30)
            await conn.execute(
                f"DELETE FROM {self._schema}.outbox WHERE id = ANY($1::bigint[])", [r["id"] for r in rows]
            )
        for row in rows:
            OUTBOX_PUBLISHED.labels(row["subject"]).inc()
        return len(rows)
