"""services/common/grpc_calls.py on a real gRPC server: an outage of a dependency is answered
UNAVAILABLE (clients retry it), a bug stays UNKNOWN, and every call is counted with its code."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest

from services.common.grpc_calls import REQUESTS, CallInterceptor
from services.common.grpc_context import Context

SERVICE = "test.Calls"


def _raise(exc: BaseException | None) -> grpc.RpcMethodHandler[bytes, bytes]:
    async def handler(request: bytes, context: Context) -> bytes:
        if exc is not None:
            raise exc
        return request

    return grpc.unary_unary_rpc_method_handler(handler)


@pytest.fixture
async def target() -> AsyncIterator[str]:
    server = grpc.aio.server(interceptors=[CallInterceptor()])
    handlers = {
        "Ok": _raise(None),
        "DatabaseAway": _raise(
            asyncpg.exceptions.CannotConnectNowError("the database system is starting up")
        ),
        "SocketGone": _raise(FileNotFoundError(2, "No such file or directory")),
        "Bug": _raise(ValueError("a bug")),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def _code(target: str, method: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(f"/{SERVICE}/{method}", None, None)
        try:
            await call(b"x", timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def _count(method: str, code: str) -> float:
    value = REQUESTS.labels(f"/{SERVICE}/{method}", code)._value.get()
    return float(value)


async def test_an_outage_is_unavailable_and_a_bug_unknown_each_counted(target: str) -> None:
    before = {m: _count(m, c) for m, c in (("Ok", "OK"), ("DatabaseAway", "UNAVAILABLE"), ("Bug", "UNKNOWN"))}
    assert await _code(target, "Ok") == grpc.StatusCode.OK
    assert await _code(target, "DatabaseAway") == grpc.StatusCode.UNAVAILABLE
    assert await _code(target, "SocketGone") == grpc.StatusCode.UNAVAILABLE
    assert await _code(target, "Bug") == grpc.StatusCode.UNKNOWN
    assert _count("Ok", "OK") == before["Ok"] + 1
    assert _count("DatabaseAway", "UNAVAILABLE") == before["DatabaseAway"] + 1
    assert _count("Bug", "UNKNOWN") == before["Bug"] + 1
