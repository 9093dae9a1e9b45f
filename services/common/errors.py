"""One error hierarchy for every service; handlers classify, the worker never parses text.

TandemError
├── RetryableError        try again later: nak(delay), up to max_deliver
├── PermanentError        this input can never succeed: dead-letter, then term()
│   └── PoisonMessage     the bytes do not decode as the subject's message type
└── FatalError            the process cannot go on (engine died, schema missing): exit,
                          readiness fails, the orchestrator restarts it
"""

from __future__ import annotations


class TandemError(Exception):
    """Base of every error the services raise on purpose."""


class RetryableError(TandemError):
    """A transient failure (database or bus unavailable, lock timeout)."""

    def __init__(self, message: str, *, delay: float = 1.0) -> None:
        super().__init__(message)
        self.delay = delay


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
