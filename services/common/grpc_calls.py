"""What every gRPC call a service answers goes through besides the auth check.

- Metrics: count by method and status code, latency by method. Methods are a bounded set (those
  in proto/); no request content is a label.
- A database or bus outage (services/common/errors.is_transient: PostgreSQL unreachable or
  restarting, NATS timeouts) is answered UNAVAILABLE, the code clients retry, instead of UNKNOWN.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

from services.common.errors import is_transient
from services.common.grpc_context import Context
from services.common.grpc_wrap import wrap

log = logging.getLogger(__name__)

REQUESTS = Counter(
    "tandem_grpc_requests_total", "gRPC calls answered, by method and status code.", ["method", "code"]
)
SECONDS = Histogram(
    "tandem_grpc_request_seconds",
    "Time to answer a gRPC call (a stream: until its last message).",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120),
)


def _code(context: Context, failed: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if failed is None:
        return grpc.StatusCode.OK.name
    # No code set: the call was cancelled (the client went away), or the handler raised.
    return (grpc.StatusCode.UNKNOWN if isinstance(failed, Exception) else grpc.StatusCode.CANCELLED).name


class CallInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method

        @contextlib.asynccontextmanager
        async def measured(request: Any, context: Context) -> AsyncIterator[None]:
            started = time.perf_counter()
            failed: BaseException | None = None
            try:
                try:
                    yield
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    log.warning("%s: %s, answered UNAVAILABLE", method, type(exc).__name__)
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE, "a dependency is unavailable; retry shortly"
                    )
            except BaseException as exc:
                failed = exc
                raise
            finally:
                SECONDS.labels(method).observe(time.perf_counter() - started)
                REQUESTS.labels(method, _code(context, failed)).inc()

        return wrap(handler, measured)
