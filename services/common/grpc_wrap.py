"""Running code around every gRPC handler, whatever its arity (unary or streaming either way).

grpc.aio's server interceptors see a method's handler, not its calls: to act on each call (check
the caller, time it) an interceptor returns a new handler whose functions run the call inside
`around(request, context)`, an async context manager entered in the call's own task (so a context
variable it sets is the handler's). A streaming request is not read ahead: `request` is None.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc

from services.common.grpc_context import Context

Around = Callable[[Any, Context], AbstractAsyncContextManager[None]]


def wrap(handler: Any, around: Around) -> Any:
    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: Context) -> Any:
            async with around(request, context):
                return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, des, ser)
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: Context) -> AsyncIterator[Any]:
            async with around(request, context):
                async for response in inner_us(request, context):
                    yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, des, ser)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: Context) -> Any:
            async with around(None, context):
                return await inner_su(requests, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, des, ser)
    inner_ss = handler.stream_stream
    assert inner_ss is not None

    async def stream_stream(requests: Any, context: Context) -> AsyncIterator[Any]:
        async with around(None, context):
            async for response in inner_ss(requests, context):
                yield response

    return grpc.stream_stream_rpc_method_handler(stream_stream, des, ser)
