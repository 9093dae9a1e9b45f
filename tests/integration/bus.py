"""Putting messages on the real bus in tests, and waiting until a consumer has handled them."""

from __future__ import annotations

import asyncio
import time
import uuid

from google.protobuf.message import Message
from nats.js import JetStreamContext

from services.common.bus.contracts import subject_for
from services.common.bus.topology import ConsumerSpec


async def publish(js: JetStreamContext, message: Message) -> None:
    # A fresh Nats-Msg-Id each time: the server's duplicate window must not hide a second copy,
    # so a repeated message reaches the consumer as a redelivery would.
    await js.publish(
        str(subject_for(message)), message.SerializeToString(), headers={"Nats-Msg-Id": str(uuid.uuid4())}
    )


async def drained(js: JetStreamContext, spec: ConsumerSpec, delivered: int, within: float = 30) -> None:
    """Wait until the consumer was handed `delivered` messages and acknowledged every one (the
    worker acks after the handler's transaction committed)."""
    deadline = time.monotonic() + within
    while True:
        info = await js.consumer_info(spec.stream, spec.name)
        done = info.num_pending == 0 and info.num_ack_pending == 0
        if done and info.delivered.consumer_seq == delivered:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{spec.name} did not settle: {info}")
        await asyncio.sleep(0.1)
