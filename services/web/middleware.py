"""Request plumbing: metrics, security headers, failures → pages, session + CSRF checks."""

from __future__ import annotations

import logging
import time
from urllib.parse import quote

import grpc
from aiohttp import web
from aiohttp.typedefs import Handler

from services.gen.tandem.identity.v1 import identity_pb2
from services.web.errors import Failure, SessionEnded, from_rpc, not_found
from services.web.grpc_clients import bearer
from services.web.metrics import REQUEST_SECONDS, REQUESTS
from services.web.session import CSRF_FIELD, CSRF_HEADER, SESSION_COOKIE, principal_of
from services.web.state import app_state, render

log = logging.getLogger(__name__)

PUBLIC_PREFIXES = ("/login", "/static/")
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
METHODS = UNSAFE | {"GET", "HEAD", "OPTIONS"}
# Routes whose body is a multipart upload: the CSRF token is its first part, checked by the view
# before it reads anything else (the middleware must not buffer a large file to find it).
CSRF_IN_FIRST_PART = frozenset({"upload", "gold_upload"})
# No inline script or style anywhere: the CSP forbids them, so an injected tag cannot run.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)


def is_api(request: web.Request) -> bool:
    return request.path.startswith("/api/")


def _route(request: web.Request) -> str:
    info = request.match_info
    resource = info.route.resource if info.http_exception is None else None
    # The route's pattern, never the concrete path: ids in label values would be unbounded.
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        route = _route(request)
        method = request.method if request.method in METHODS else "other"  # any token is a method
        REQUESTS.labels(route, method, str(status)).inc()
        REQUEST_SECONDS.labels(route).observe(time.perf_counter() - start)


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CSP)
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "same-origin")
    headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
    if app_state(request).secure_cookies:
        headers.setdefault("Strict-Transport-Security", "max-age=31536000")
    if request.path.startswith("/static/"):
        # Asset URLs carry a digest of the assets (render.static_version): a changed file has a new URL.
        headers.setdefault("Cache-Control", "public, max-age=86400")
    else:
        # Pages show one person's data: no proxy or back button may keep a copy.
        headers["Cache-Control"] = "no-store"


def _to_login(request: web.Request) -> web.StreamResponse:
    if is_api(request):
        response: web.StreamResponse = web.json_response(
            {"error": "unauthenticated", "message": "Your session has ended: log in again."}, status=401
        )
    else:
        target = request.path_qs if request.method == "GET" else "/"
        response = web.HTTPSeeOther(f"/login?next={quote(target, safe='')}")
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


def failure_response(request: web.Request, failure: Failure) -> web.StreamResponse:
    if is_api(request):
        return web.json_response({"error": failure.kind, "message": failure.message}, status=failure.status)
    return render(request, "error.html", status=failure.status, failure=failure)


@web.middleware
async def failures(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Failure as failure:
        return failure_response(request, failure)
    except SessionEnded:
        if "token" in request:
            app_state(request).sessions.drop(request["token"])
        return _to_login(request)
    except grpc.aio.AioRpcError as error:
        mapped = from_rpc(error, app_state(request).backends.service_named_in(error.debug_error_string()))
        if isinstance(mapped, SessionEnded):
            if "token" in request:
                app_state(request).sessions.drop(request["token"])
            return _to_login(request)
        if mapped.status == 500:
            log.error("unexpected gRPC error on %s: %s %s", request.path, error.code(), error.details())
        return failure_response(request, mapped)
    except web.HTTPNotFound:
        return failure_response(request, not_found())
    except web.HTTPMethodNotAllowed:
        return failure_response(
            request, Failure(405, "Not allowed", "This address does not take that.", "method")
        )
    except web.HTTPException:
        raise  # redirects and the like
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return failure_response(
            request,
            Failure(500, "Something went wrong", "The error was logged. Try again in a moment.", "internal"),
        )


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith(PUBLIC_PREFIXES):
        return await handler(request)
    st = app_state(request)
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        return _to_login(request)
    request["token"] = token
    state = st.sessions.fresh(token)
    if state is None:
        # UNAUTHENTICATED here (expired, revoked, disabled) sends the person to the login page.
        who = await st.backends.identity.WhoAmI(
            identity_pb2.WhoAmIRequest(),
            metadata=bearer(token),
            timeout=st.settings.call_timeout_seconds,
        )
        state = st.sessions.put(token, principal_of(who))
    request["session"] = state
    if request.method in UNSAFE and not await _csrf_ok(request, token):
        raise Failure(
            403,
            "Not allowed",
            "The form was missing its security token or it did not match your session. "
            "Reload the page and try again.",
            "csrf",
        )
    return await handler(request)


async def _csrf_ok(request: web.Request, token: str) -> bool:
    csrf = app_state(request).csrf
    offered = request.headers.get(CSRF_HEADER)
    if offered:
        return csrf.check(token, offered)
    ctype = request.content_type
    if ctype == "multipart/form-data":
        return request.match_info.route.name in CSRF_IN_FIRST_PART
    if ctype == "application/x-www-form-urlencoded":
        form = await request.post()
        value = form.get(CSRF_FIELD)
        return csrf.check(token, value if isinstance(value, str) else None)
    return False
