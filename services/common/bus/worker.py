"""The one consumer loop every service uses.

Fetch a batch from a durable pull consumer, decode each message by its subject, hand it to the
handler, then settle it explicitly:

- success                      ack (after the handler's transaction committed)
- retryable / unexpected       nak(delay), the delay doubling from 1 s up to 60 s, until
                               max_deliver (20 by default: about 14 minutes, so a database
                               restart or a bus hiccup costs no message); the last delivery is
                               dead-lettered instead of being dropped silently
- permanent (poison, bad data) publish to tandem.dlq.<consumer> with the reason, then term()
- FatalError                   nak so another replica gets it, then stop the process

Which is which is `services.common.errors.classify`: by exception type, never by text.
A fetch that fails on a passing bus error (JetStream 503, no responders, reconnecting) is
retried with a back-off of its own; the loop does not end on it.

Handlers must be idempotent: the same message can arrive twice (redelivery after a crash
between commit and ack).

Beside the loop, each worker reads its consumer's info every `lag_interval` seconds and exports
the backlog (tandem_bus_consumer_pending, tandem_bus_consumer_ack_pending) for the lag alerts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from google.protobuf.message import Message
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from prometheus_client import Gauge

from services.common.bus.contracts import Subject, decode, dlq_subject
from services.common.bus.topology import ConsumerSpec
from services.common.errors import FatalError, PermanentError, RetryableError, classify, is_transient
from services.common.metrics import BUS_BATCH_ITEMS, BUS_DEAD_LETTERS, BUS_HANDLER_SECONDS, BUS_MESSAGES

log = logging.getLogger(__name__)

# Every replica reports the same server-side numbers: aggregate with max by (consumer).
CONSUMER_PENDING = Gauge(
    "tandem_bus_consumer_pending", "Messages in the stream not yet delivered to the consumer.", ["consumer"]
)
CONSUMER_ACK_PENDING = Gauge(
    "tandem_bus_consumer_ack_pending", "Messages delivered to the consumer and not yet acked.", ["consumer"]
)


@dataclass(frozen=True)
class Delivery:
    """What a handler gets: the decoded message plus what it needs to stay idempotent."""

    subject: Subject
    message: Message
    msg_id: str  # stable across redeliveries: stream name + stream sequence
    num_delivered: int
    raw: Msg

    async def heartbeat(self) -> None:
        """Tell the server the message is still being worked on (long LLM batches)."""
        await self.raw.in_progress()


Handler = Callable[[Delivery], Awaitable[None]]
OnFatal = Callable[[BaseException], None]


def _items_in(message: Message) -> int:
    for field_name in ("items", "predictions", "tasks", "labels", "item_ids"):
        if message.DESCRIPTOR.fields_by_name.get(field_name) is not None:
            return len(getattr(message, field_name))
    return 1


def retry_delay(exc: BaseException, num_delivered: int, base: float, cap: float) -> float:
    """Seconds before a failed message comes back: doubling from the error's own delay (or
    `base`) with each delivery, up to `cap`; flat for a RetryableError without back-off."""
    first = exc.delay if isinstance(exc, RetryableError) else base
    if isinstance(exc, RetryableError) and not exc.backoff:
        return min(first, cap)
    return min(first * 2.0 ** (num_delivered - 1), cap)


class Worker:
    def __init__(
        self,
        js: JetStreamContext,
        spec: ConsumerSpec,
        handler: Handler,
        *,
        on_fatal: OnFatal,
        fetch_batch: int = 8,
        fetch_timeout: float = 1.0,
        base_retry_delay: float = 1.0,
        max_retry_delay: float = 60.0,
        fetch_retry_delay: float = 0.5,
        max_fetch_retry_delay: float = 10.0,
        lag_interval: float = 15.0,
    ) -> None:
        self._js = js
        self._spec = spec
        self._handler = handler
        self._on_fatal = on_fatal
        self._fetch_batch = fetch_batch
        self._fetch_timeout = fetch_timeout
        self._base_retry_delay = base_retry_delay
        self._max_retry_delay = max_retry_delay
        self._fetch_retry_delay = fetch_retry_delay
        self._max_fetch_retry_delay = max_fetch_retry_delay
        self._lag_interval = lag_interval
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def name(self) -> str:
        return self._spec.name

    def stop_fetching(self) -> None:
        self._stopping.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def run(self) -> None:
        sub = await self._js.pull_subscribe_bind(durable=self._spec.name, stream=self._spec.stream)
        failed_fetches = 0
        lag = asyncio.create_task(self._watch_lag(), name=f"{self._spec.name}-lag")
        try:
            while not self._stopping.is_set():
                try:
                    msgs = await sub.fetch(self._fetch_batch, timeout=self._fetch_timeout)
                except (NatsTimeoutError, TimeoutError):
                    # nats-py raises either, depending on the batch size.
                    failed_fetches = 0
                    continue
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    # A 503 while the stream's leader moves, or the connection reconnecting:
                    # the consumer is still there, so wait and fetch again.
                    failed_fetches += 1
                    delay = min(
                        self._fetch_retry_delay * 2 ** (failed_fetches - 1), self._max_fetch_retry_delay
                    )
                    log.warning(
                        "%s: fetch failed (%d in a row), again in %.1fs: %r",
                        self._spec.name,
                        failed_fetches,
                        delay,
                        exc,
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), delay)
                    continue
                failed_fetches = 0
                self._idle.clear()
                try:
                    for msg in msgs:
                        try:
                            await self._settle(msg)
                        except Exception:
                            # Settling itself failed (bus down): the server redelivers after ack_wait.
                            log.exception("%s: could not settle a message", self._spec.name)
                finally:
                    self._idle.set()
        finally:
            lag.cancel()
            await asyncio.gather(lag, return_exceptions=True)
            await sub.unsubscribe()

    async def _watch_lag(self) -> None:
        """Export the consumer's backlog; a failed read only skips one sample."""
        consumer = self._spec.name
        while not self._stopping.is_set():
            try:
                info = await self._js.consumer_info(self._spec.stream, consumer)
            except Exception as exc:
                log.debug("%s: could not read consumer info: %r", consumer, exc)
            else:
                CONSUMER_PENDING.labels(consumer).set(info.num_pending or 0)
                CONSUMER_ACK_PENDING.labels(consumer).set(info.num_ack_pending or 0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self._lag_interval)

    async def _settle(self, msg: Msg) -> None:
        consumer = self._spec.name
        meta = msg.metadata
        started = time.perf_counter()
        outcome = "ack"
        try:
            subject, message = decode(msg.subject, msg.data)
            BUS_BATCH_ITEMS.labels(consumer).observe(_items_in(message))
            delivery = Delivery(
                subject=subject,
                message=message,
                msg_id=f"{meta.stream}:{meta.sequence.stream}",
                num_delivered=meta.num_delivered,
                raw=msg,
            )
            await self._handler(delivery)
            await msg.ack()
        except PermanentError as exc:
            outcome = "dead_letter"
            await self._dead_letter(msg, f"permanent: {exc}")
        except FatalError as exc:
            outcome = "fatal"
            log.error("%s: fatal error, stopping: %s", consumer, exc)
            await msg.nak()
            self._stopping.set()
            self._on_fatal(exc)
        except Exception as exc:
            if classify(exc) == "permanent":
                # Bad data (asyncpg DataError, a constraint, a ValueError on the payload).
                outcome = "dead_letter"
                await self._dead_letter(msg, f"permanent: {exc!r}")
            elif meta.num_delivered >= self._spec.max_deliver:
                outcome = "dead_letter"
                await self._dead_letter(msg, f"gave up after {meta.num_delivered} deliveries: {exc!r}")
            else:
                # Retryable and unforeseen alike: back off, never lose the message. Only an
                # unforeseen error earns a traceback; a known blip is expected now and then.
                outcome = "nak"
                delay = retry_delay(exc, meta.num_delivered, self._base_retry_delay, self._max_retry_delay)
                expected = is_transient(exc)
                log.log(
                    logging.WARNING if expected else logging.ERROR,
                    "%s: retry in %.1fs (delivery %d of %d): %r",
                    consumer,
                    delay,
                    meta.num_delivered,
                    self._spec.max_deliver,
                    exc,
                    exc_info=not expected,
                )
                await msg.nak(delay=delay)
        finally:
            BUS_MESSAGES.labels(consumer, outcome).inc()
            BUS_HANDLER_SECONDS.labels(consumer).observe(time.perf_counter() - started)

    async def _dead_letter(self, msg: Msg, reason: str) -> None:
        consumer = self._spec.name
        meta = msg.metadata
        log.error("%s: dead-lettering %s seq %d: %s", consumer, msg.subject, meta.sequence.stream, reason)
        headers = {
            "Nats-Msg-Id": f"dlq:{consumer}:{meta.stream}:{meta.sequence.stream}",
            "Tandem-Error": reason[:1000],
            "Tandem-Subject": msg.subject,
            "Tandem-Stream-Seq": str(meta.sequence.stream),
            "Tandem-Deliveries": str(meta.num_delivered),
        }
        # Publish first: if it fails the message is redelivered rather than lost.
        await self._js.publish(dlq_subject(consumer), msg.data, headers=headers)
        BUS_DEAD_LETTERS.labels(consumer).inc()
        await msg.term()
