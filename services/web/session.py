"""The session cookie, CSRF tokens, and what the app remembers per session.

The cookie holds the session token identity issued at login, nothing else: every gRPC call
carries it, so a logout, a revocation or a disabled user ends the session at the services at
once. CSRF tokens are HMAC(secret, session token): stateless, so any replica sharing the secret
checks them, and a token is worthless for any other session.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from services.common.auth import Principal, Role, token_digest
from services.gen.tandem.identity.v1 import identity_pb2

SESSION_COOKIE = "tandem_session"
LOGIN_COOKIE = "tandem_login"  # a nonce binding the login form to this browser (login CSRF)
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf"


class Csrf:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _sign(self, purpose: str, value: str) -> str:
        return hmac.new(self._secret, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()

    def token(self, session_token: str) -> str:
        return self._sign("session", session_token)

    def check(self, session_token: str, offered: str | None) -> bool:
        return bool(offered) and hmac.compare_digest(self.token(session_token), offered or "")

    @staticmethod
    def new_login_nonce() -> str:
        return secrets.token_urlsafe(24)

    def login_token(self, nonce: str) -> str:
        return self._sign("login", nonce)

    def check_login(self, nonce: str | None, offered: str | None) -> bool:
        return (
            bool(nonce)
            and bool(offered)
            and hmac.compare_digest(self.login_token(nonce or ""), offered or "")
        )


def principal_of(message: identity_pb2.Principal) -> Principal:
    return Principal(
        user_id=message.user_id,
        role=Role.from_proto(message.role),
        project_ids=frozenset(message.project_ids),
        display_name=message.display_name,
    )


@dataclass
class SessionState:
    principal: Principal
    fetched: float
    # Skips per project in this session. The review service never hands a person a task they
    # skipped (unless asked to) and cannot cheaply say whether any are left: this only decides
    # whether an empty queue offers "show the tasks I skipped".
    skips: Counter[str] = field(default_factory=Counter)


class Sessions:
    """Per-session memory, keyed by the token's digest (the token itself is never kept).

    The principal (role, memberships) is believed for `ttl` seconds, then asked of identity again;
    it decides only what the pages offer, never what a person may do (the services check that on
    every call). Bounded: the least recently used sessions are forgotten first."""

    def __init__(self, ttl: float, capacity: int = 20_000) -> None:
        self._ttl = ttl
        self._capacity = capacity
        self._states: OrderedDict[str, SessionState] = OrderedDict()

    def get(self, token: str) -> SessionState | None:
        key = token_digest(token)
        state = self._states.get(key)
        if state is None:
            return None
        self._states.move_to_end(key)
        return state

    def fresh(self, token: str) -> SessionState | None:
        state = self.get(token)
        if state is None or time.monotonic() - state.fetched > self._ttl:
            return None
        return state

    def put(self, token: str, principal: Principal) -> SessionState:
        key = token_digest(token)
        state = self._states.get(key)
        if state is None:
            state = SessionState(principal, time.monotonic())
            self._states[key] = state
        else:
            state.principal, state.fetched = principal, time.monotonic()
        self._states.move_to_end(key)
        while len(self._states) > self._capacity:
            self._states.popitem(last=False)
        return state

    def drop(self, token: str) -> None:
        self._states.pop(token_digest(token), None)
