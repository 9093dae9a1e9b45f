"""Log in and out."""

from __future__ import annotations

import contextlib
import logging

import grpc
from aiohttp import web

from services.gen.tandem.identity.v1 import identity_pb2
from services.web.grpc_clients import bearer
from services.web.session import CSRF_FIELD, LOGIN_COOKIE, SESSION_COOKIE, principal_of
from services.web.state import app_state, render

log = logging.getLogger(__name__)

LOGIN_TIMEOUT_SECONDS = 30.0


def _safe_next(value: str | None) -> str:
    # Only a path on this site: an open redirect would make the login page a phishing aid.
    if (
        value
        and value.startswith("/")
        and not value.startswith(("//", "/\\"))
        and not value.startswith("/login")
    ):
        return value
    return "/"


def client_address(request: web.Request) -> str:
    if app_state(request).settings.trust_forwarded_for:
        forwarded = request.headers.get("X-Forwarded-For", "")
        if forwarded:
            # The last entry is the one the trusted proxy added; earlier ones the client may forge
            # (and would then spread its failed logins over addresses it invents).
            return forwarded.split(",")[-1].strip()
    return request.remote or ""


def _login_page(
    request: web.Request, *, error: str = "", user_id: str = "", status: int = 200
) -> web.Response:
    st = app_state(request)
    nonce = request.cookies.get(LOGIN_COOKIE) or st.csrf.new_login_nonce()
    response = render(
        request,
        "login.html",
        status=status,
        error=error,
        user_id=user_id,
        login_csrf=st.csrf.login_token(nonce),
        next=_safe_next(request.query.get("next")),
    )
    response.set_cookie(
        LOGIN_COOKIE,
        nonce,
        httponly=True,
        samesite="Strict",
        secure=st.secure_cookies,
        path="/login",
        max_age=3600,
    )
    return response


async def login_form(request: web.Request) -> web.StreamResponse:
    if request.cookies.get(SESSION_COOKIE):
        # Already logged in? Only if the services still think so.
        st = app_state(request)
        token = request.cookies[SESSION_COOKIE]
        with contextlib.suppress(grpc.aio.AioRpcError):
            await st.backends.identity.WhoAmI(identity_pb2.WhoAmIRequest(), metadata=bearer(token), timeout=5)
            raise web.HTTPSeeOther(_safe_next(request.query.get("next")))
    return _login_page(request)


async def login(request: web.Request) -> web.StreamResponse:
    st = app_state(request)
    form = await request.post()
    user_id = str(form.get("user_id", "")).strip()
    password = str(form.get("password", ""))
    if not st.csrf.check_login(request.cookies.get(LOGIN_COOKIE), str(form.get(CSRF_FIELD, ""))):
        return _login_page(
            request, error="The login form expired. Please try again.", user_id=user_id, status=403
        )
    if not user_id or not password:
        return _login_page(request, error="Enter your user id and password.", user_id=user_id, status=400)
    try:
        answer = await st.backends.identity.Login(
            identity_pb2.LoginRequest(
                user_id=user_id,
                password=password,
                client_address=client_address(request),
                session_seconds=st.settings.session_seconds,
            ),
            # Password hashing is slow on purpose (argon2): a burst of logins queues at identity.
            timeout=max(st.settings.call_timeout_seconds, LOGIN_TIMEOUT_SECONDS),
        )
    except grpc.aio.AioRpcError as error:
        code = error.code()
        if code in (
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.NOT_FOUND,
        ):
            # One message for a wrong user and a wrong password: the page must not tell which exist.
            return _login_page(request, error="Wrong user id or password.", user_id=user_id, status=401)
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            return _login_page(
                request, error=error.details() or "Too many attempts.", user_id=user_id, status=429
            )
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            return _login_page(request, error="Wrong user id or password.", user_id=user_id, status=400)
        raise
    st.sessions.put(answer.token, principal_of(answer.principal))
    response = web.HTTPSeeOther(_safe_next(str(form.get("next", "")) or None))
    response.set_cookie(
        SESSION_COOKIE,
        answer.token,
        httponly=True,
        samesite="Strict",
        secure=st.secure_cookies,
        path="/",
        max_age=int(st.settings.session_seconds),
    )
    response.del_cookie(LOGIN_COOKIE, path="/login")
    log.info("login: %s", answer.principal.user_id)
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    st = app_state(request)
    token: str = request["token"]
    # The session ends at the services whether or not identity answers now; the cookie goes too.
    with contextlib.suppress(grpc.aio.AioRpcError):
        await st.backends.identity.Logout(identity_pb2.LogoutRequest(), metadata=bearer(token), timeout=5)
    st.sessions.drop(token)
    response = web.HTTPSeeOther("/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    raise response
