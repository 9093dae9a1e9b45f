"""What the SDK raises when a service says no.

    TandemError                  every failure of a call, with the service's own message
    ├── InvalidArgument          the request is wrong: fix it (bad project id, unknown field)
    ├── NotFound                 no such project or export
    ├── AlreadyExists            the project id is taken
    ├── Unauthenticated          no token, or an expired or revoked one
    ├── PermissionDenied         the token's user may not do this (role, project membership)
    ├── FailedPrecondition       not now (e.g. a change the running project cannot take)
    ├── ResourceExhausted        over a limit
    └── Unavailable              a service cannot be reached (already retried by gRPC)

The gRPC status stays on the exception (`code`), so nobody has to parse the message.
"""

from __future__ import annotations

import grpc


class TandemError(Exception):
    """A call to a Tandem service failed; `str()` is the service's message."""

    code: grpc.StatusCode | None = None

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidArgument(TandemError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(TandemError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(TandemError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Unauthenticated(TandemError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(TandemError):
    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(TandemError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(TandemError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(TandemError):
    code = grpc.StatusCode.UNAVAILABLE


_BY_CODE: dict[grpc.StatusCode, type[TandemError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        Unauthenticated,
        PermissionDenied,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
    )
    if cls.code is not None
}


def from_rpc_error(exc: grpc.RpcError, *, hint: str = "") -> TandemError:
    """The SDK's exception for a failed call; `hint` is added where the client knows more than
    the service (e.g. that it sent no token at all)."""
    # Sync gRPC raises RpcError objects that are also grpc.Call (code, details).
    code: grpc.StatusCode | None = exc.code() if isinstance(exc, grpc.Call) else None
    details = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
    message = f"{details} ({hint})" if hint else details
    cls = _BY_CODE.get(code, TandemError) if code is not None else TandemError
    return cls(message, code=code)
