"""What every handler reaches through the application: settings, the gRPC backends, templates,
CSRF and per-session memory; and the current request's session."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jinja2
from aiohttp import web

from services.common.auth import Action, Principal, Role
from services.web.grpc_clients import Backends, Metadata, bearer
from services.web.progress import Progress
from services.web.render import page
from services.web.session import Csrf, Sessions, SessionState
from services.web.settings import WebSettings
from services.web.throughput import Throughput


@dataclass
class WebState:
    settings: WebSettings
    backends: Backends
    env: jinja2.Environment
    csrf: Csrf
    sessions: Sessions
    progress: Progress
    throughput: Throughput
    secure_cookies: bool


STATE = web.AppKey("tandem_web", WebState)


def app_state(request: web.Request) -> WebState:
    return request.app[STATE]


def session_token(request: web.Request) -> str:
    token: str = request["token"]
    return token


def session(request: web.Request) -> SessionState:
    state: SessionState = request["session"]
    return state


def principal(request: web.Request) -> Principal:
    return session(request).principal


def auth(request: web.Request) -> dict[str, Any]:
    """Keyword arguments for a gRPC call made on behalf of the logged-in person."""
    metadata: Metadata = bearer(session_token(request))
    return {"metadata": metadata, "timeout": app_state(request).settings.call_timeout_seconds}


def nav(who: Principal) -> dict[str, bool]:
    """What the menus offer a role; the services decide what it may actually do."""
    return {
        "may_label": who.may(Action.LABEL),
        "may_review": who.role in (Role.ADMIN, Role.MANAGER, Role.REVIEWER),
        "may_create": who.may(Action.CREATE_PROJECT),
        "may_edit": who.may(Action.EDIT_PROJECT),
        "may_ingest": who.may(Action.INGEST),
        "may_export": who.may(Action.EXPORT),
        "may_members": who.may(Action.MANAGE_MEMBERS),
        "may_users": who.may(Action.MANAGE_USERS),
        "may_workforce": who.may(Action.MANAGE_WORKFORCE),
    }


def render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    st = app_state(request)
    base: dict[str, Any] = {"request_path": request.path, "who": None, "nav": {}, "csrf": ""}
    if "session" in request:
        who = principal(request)
        base.update(who=who, nav=nav(who), csrf=st.csrf.token(session_token(request)))
    base.update(context)
    return page(st.env, template, base, status)
