"""Tandem from Python: `from tandem import Client`. See docs/sdk.md."""

from tandem.client import Client
from tandem.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TandemError,
    Unauthenticated,
    Unavailable,
)
from tandem.models import IngestSummary, Project, Rejection, Status

__all__ = [
    "AlreadyExists",
    "Client",
    "FailedPrecondition",
    "IngestSummary",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Project",
    "Rejection",
    "ResourceExhausted",
    "Status",
    "TandemError",
    "Unauthenticated",
    "Unavailable",
]
