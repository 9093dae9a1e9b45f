"""One error hierarchy for every service; handlers classify, the worker never parses text.

TandemError
├── RetryableError        try again later: nak(delay), up to max_deliver
├── PermanentError        this input can never succeed: dead-letter, then term()
│   └── PoisonMessage     the bytes do not decode as the subject's message type
└── FatalError            the process cannot go on (engine died, schema missing): exit,
                          readiness fails, the orchestrator restarts it

Errors raised by libraries are classified by type (`classify`), never by their text:

- retryable   the database or the bus is briefly away: connection lost or refused, too many
              connections, server shutting down or starting, serialization failure and deadlock
              (40001, 40P01), OS-level connection errors and timeouts, NATS timeouts, no
              responders, closed or reconnecting connections, JetStream 503
- permanent   the input is wrong: asyncpg data and integrity errors, ValueError from a payload,
              PermanentError (PoisonMessage included)
- anything else is retried too, but within the same bounded budget, and is dead-lettered when
  that runs out: an unforeseen error may be a blip as well as a bug, and losing the message is
  worse than retrying it for a few minutes
"""

from __future__ import annotations

from typing import Literal

import asyncpg
import nats.errors
import nats.js.errors

Disposition = Literal["retryable", "permanent"]


class TandemError(Exception):
    """Base of every error the services raise on purpose."""


class RetryableError(TandemError):
    """A transient failure (database or bus unavailable, lock timeout)."""

    def __init__(self, message: str, *, delay: float = 1.0, backoff: bool = True) -> None:
        super().__init__(message)
        self.delay = delay
        # False: nothing is failing, the message is for someone else (a project another scorer
        # replica decides), so every retry waits `delay` instead of doubling towards a minute.
        self.backoff = backoff


class PermanentError(TandemError):
    """The input is wrong and retrying cannot help."""


class PoisonMessage(PermanentError):
    """A bus message that cannot be decoded."""


class FatalError(TandemError):
    """The service must stop."""


class UnknownProject(PermanentError):
    def __init__(self, project_id: str) -> None:
        super().__init__(f"unknown project {project_id!r}")
        self.project_id = project_id


_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    RetryableError,
    asyncpg.exceptions.PostgresConnectionError,  # 08xxx, ConnectionDoesNotExistError included
    asyncpg.exceptions.CannotConnectNowError,  # 57P03
    asyncpg.exceptions.AdminShutdownError,  # 57P01
    asyncpg.exceptions.CrashShutdownError,  # 57P02
    asyncpg.exceptions.TooManyConnectionsError,  # 53300
    asyncpg.exceptions.SerializationError,  # 40001
    asyncpg.exceptions.DeadlockDetectedError,  # 40P01
    asyncpg.exceptions.LockNotAvailableError,  # 55P03
    # The server went away in the middle of a statement: the connection's protocol is left in a
    # state no later call can use ("cannot switch to state 11; another operation is in progress").
    asyncpg.exceptions.InternalClientError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.NoServersError,
    nats.js.errors.ServiceUnavailableError,  # JetStream 503: no meta leader yet, stream moving
    nats.js.errors.NoStreamResponseError,
    OSError,  # ConnectionError included
    TimeoutError,  # asyncio.TimeoutError is this very type since Python 3.11
)

_PERMANENT_TYPES: tuple[type[BaseException], ...] = (
    PermanentError,
    asyncpg.exceptions.DataError,  # 22xxx
    asyncpg.exceptions.IntegrityConstraintViolationError,  # 23xxx
    ValueError,  # asyncpg's client-side DataError and ClientConfigurationError included
)


def is_transient(exc: BaseException) -> bool:
    """A known passing failure of the database or the bus: retried, logged without a traceback."""
    if isinstance(exc, _TRANSIENT_TYPES):
        return True
    # A pooled connection that the server dropped raises a bare InterfaceError ("connection is
    # closed"); its subclasses are the API misuses and bad inputs, which are not transient.
    return type(exc) is asyncpg.exceptions.InterfaceError


def classify(exc: BaseException) -> Disposition:
    """How the worker treats a handler's exception (a FatalError stops it before this)."""
    if isinstance(exc, RetryableError):
        return "retryable"
    if isinstance(exc, _PERMANENT_TYPES):
        return "permanent"
    # Transient and unforeseen alike: retried within the consumer's bounded delivery budget.
    return "retryable"
