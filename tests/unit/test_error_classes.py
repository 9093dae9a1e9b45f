"""Which failures the worker retries and which it dead-letters at once, by exception type."""

from __future__ import annotations

import asyncio
import errno

import asyncpg
import nats.errors
import nats.js.errors
import pytest
from google.protobuf.message import DecodeError

from services.common.bus.contracts import decode
from services.common.bus.worker import retry_delay
from services.common.errors import (
    FatalError,
    PermanentError,
    PoisonMessage,
    RetryableError,
    UnknownProject,
    classify,
    is_transient,
)

pg = asyncpg.exceptions

TRANSIENT: list[BaseException] = [
    RetryableError("lock timeout", delay=2.0),
    # PostgreSQL restarting, failing over or out of connections.
    pg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    pg.ConnectionFailureError("connection failure"),
    pg.PostgresConnectionError("connection exception"),
    pg.CannotConnectNowError("the database system is starting up"),
    pg.AdminShutdownError("terminating connection due to administrator command"),
    pg.CrashShutdownError("terminating connection because of crash of another server process"),
    pg.TooManyConnectionsError("sorry, too many clients already"),
    pg.SerializationError("could not serialize access due to concurrent update"),
    pg.DeadlockDetectedError("deadlock detected"),
    pg.LockNotAvailableError("could not obtain lock on row"),
    pg.InterfaceError("connection is closed"),
    pg.InternalClientError("cannot switch to state 11; another operation (2) is in progress"),
    # The socket under either client.
    ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    OSError(errno.EHOSTUNREACH, "No route to host"),
    TimeoutError(),
    # NATS and JetStream.
    nats.errors.TimeoutError(),
    nats.js.errors.FetchTimeoutError(),
    nats.errors.NoRespondersError(),
    nats.errors.ConnectionClosedError(),
    nats.errors.ConnectionReconnectingError(),
    nats.errors.StaleConnectionError(),
    nats.errors.NoServersError(),
    nats.js.errors.ServiceUnavailableError(code=503, description="JetStream system temporarily unavailable"),
    nats.js.errors.NoStreamResponseError(),
]

PERMANENT: list[BaseException] = [
    PermanentError("unknown label"),
    PoisonMessage("payload is not a valid ItemBatch"),
    UnknownProject("p9"),
    pg.DataError("invalid input syntax"),
    pg.InvalidTextRepresentationError('invalid input syntax for type uuid: "x"'),
    pg.NumericValueOutOfRangeError("value out of range"),
    pg.UniqueViolationError('duplicate key value violates unique constraint "items_pkey"'),
    pg.ForeignKeyViolationError("insert or update violates foreign key constraint"),
    pg.NotNullViolationError('null value in column "text"'),
    pg.CheckViolationError("new row violates check constraint"),
    # asyncpg's client-side checks of an argument: the same input fails every time.
    asyncpg.exceptions._base.DataError("invalid input for query argument $1"),
    ValueError("confidence must be in [0, 1]"),
    UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
]

# Neither known blip nor bad input: retried within the budget (it may be either), with a traceback.
UNFORESEEN: list[BaseException] = [
    RuntimeError("bug"),
    KeyError("label"),
    pg.UndefinedTableError('relation "items" does not exist'),
    pg.UnsupportedServerFeatureError("the server does not support this feature"),
    nats.js.errors.BadRequestError(code=400, description="bad request"),
]


@pytest.mark.parametrize("exc", TRANSIENT, ids=lambda e: type(e).__name__)
def test_transient_failures_are_retried_quietly(exc: BaseException) -> None:
    assert classify(exc) == "retryable"
    assert is_transient(exc)


@pytest.mark.parametrize("exc", PERMANENT, ids=lambda e: type(e).__name__)
def test_bad_input_is_dead_lettered_at_once(exc: BaseException) -> None:
    assert classify(exc) == "permanent"
    assert not is_transient(exc)


@pytest.mark.parametrize("exc", UNFORESEEN, ids=lambda e: type(e).__name__)
def test_unforeseen_errors_are_retried_within_the_budget(exc: BaseException) -> None:
    assert classify(exc) == "retryable"
    assert not is_transient(exc)


def test_a_payload_that_does_not_decode_is_permanent() -> None:
    with pytest.raises(PoisonMessage) as caught:
        decode("tandem.items.v1.ingested", b"\xff\xff\xff not a protobuf")
    assert isinstance(caught.value.__cause__, DecodeError)
    assert classify(caught.value) == "permanent"


async def test_a_real_timeout_is_transient() -> None:
    with pytest.raises(TimeoutError) as caught:
        await asyncio.wait_for(asyncio.sleep(1), 0.001)
    assert classify(caught.value) == "retryable"
    assert is_transient(caught.value)


async def test_a_refused_connection_is_transient() -> None:
    # Port 1 on loopback: nothing listens there.
    with pytest.raises(OSError) as caught:
        await asyncpg.connect("postgresql://x@127.0.0.1:1/x", timeout=5)
    assert classify(caught.value) == "retryable"
    assert is_transient(caught.value)


def test_fatal_is_not_classified_as_permanent() -> None:
    # The worker handles FatalError before it classifies; here it only must not read as bad input.
    assert classify(FatalError("engine died")) == "retryable"


def test_retries_double_up_to_a_minute_but_a_message_for_another_replica_waits_flat() -> None:
    assert [retry_delay(RuntimeError("bug"), n, 1.0, 60.0) for n in (1, 2, 3, 8)] == [1.0, 2.0, 4.0, 60.0]
    assert [retry_delay(RetryableError("db", delay=0.5), n, 1.0, 60.0) for n in (1, 3)] == [0.5, 2.0]
    elsewhere = RetryableError("another replica decides it", delay=1.0, backoff=False)
    assert [retry_delay(elsewhere, n, 1.0, 60.0) for n in (1, 5, 19)] == [1.0, 1.0, 1.0]
