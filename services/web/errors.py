"""What a person sees when something fails: one clear page (or JSON answer) per kind of failure.

gRPC status → HTTP:
  UNAUTHENTICATED                      → back to the login page (the session ended)
  PERMISSION_DENIED                    → 403 "not allowed"
  NOT_FOUND                            → 404
  FAILED_PRECONDITION, ALREADY_EXISTS  → 409 (a lease lost, a task already labeled, an id taken)
  INVALID_ARGUMENT, OUT_OF_RANGE       → 400 with the service's message (it says what to fix)
  RESOURCE_EXHAUSTED                   → 429 (too many logins)
  UNAVAILABLE, DEADLINE_EXCEEDED       → 503 "service down"
  anything else                        → 500, logged; never a stack trace on the page
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc


@dataclass
class Failure(Exception):
    status: int
    title: str
    message: str
    kind: str  # a stable word for the JSON API and the tests

    def __str__(self) -> str:
        return f"{self.status} {self.title}: {self.message}"


class SessionEnded(Exception):
    """The services no longer accept the session token: log in again."""


def not_found(message: str = "There is nothing at this address.") -> Failure:
    return Failure(404, "Not found", message, "not_found")


def forbidden(message: str) -> Failure:
    return Failure(403, "Not allowed", message, "forbidden")


def bad_request(message: str) -> Failure:
    return Failure(400, "Cannot do that", message, "invalid")


def from_rpc(error: grpc.aio.AioRpcError, service: str = "") -> Failure | SessionEnded:
    code, details = error.code(), error.details() or ""
    named = f"the {service} service" if service else "a service this page needs"
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return SessionEnded(details)
    if code is grpc.StatusCode.PERMISSION_DENIED:
        return forbidden(details or "Your role or your project memberships do not allow this.")
    if code is grpc.StatusCode.NOT_FOUND:
        return not_found(details or "It does not exist, or no longer does.")
    if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS):
        return Failure(409, "Cannot do that now", details, "conflict")
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        return bad_request(details)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Failure(429, "Too many attempts", details or "Wait a moment and try again.", "limited")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Failure(
            503,
            "Service down",
            f"{named.capitalize()} is not answering right now. Nothing was lost: try again in a moment.",
            "unavailable",
        )
    return Failure(500, "Something went wrong", "The error was logged. Try again in a moment.", "internal")
