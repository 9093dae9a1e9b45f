"""Identity rules, free of I/O: names, passwords, who may act for whom, the login rate limit."""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from services.common.auth import Principal, Role

USER_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
# argon2id with the library's defaults (RFC 9106 low-memory profile: 64 MiB, 3 passes).
_HASHER = PasswordHasher()


class Refused(Exception):
    """A request the rules refuse; `code` names the kind for the handler's status."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # invalid | denied | limited


def check_user_id(user_id: str) -> str:
    if not USER_ID.match(user_id):
        raise Refused("invalid", f"user id {user_id!r} must match [a-z0-9][a-z0-9._-]{{0,62}}")
    return user_id


def check_password(password: str, min_length: int) -> str:
    if len(password) < min_length:
        raise Refused("invalid", f"a password needs at least {min_length} characters")
    if len(password) > 1024:
        raise Refused("invalid", "a password may have at most 1024 characters")
    return password


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    if not stored_hash:
        # Same work as a real check, so timing does not tell which users exist.
        _HASHER.hash(password)
        return False
    try:
        return _HASHER.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def may_act_for(principal: Principal, user_id: str) -> None:
    """Tokens of one's own, or anyone's for an admin."""
    if user_id != principal.user_id and principal.role is not Role.ADMIN:
        raise Refused("denied", "only an admin manages another user's tokens")


def token_ttl(requested: float, default: float, maximum: float) -> float:
    if requested < 0:
        raise Refused("invalid", "ttl_seconds must not be negative")
    return min(requested or default, maximum)


@dataclass
class LoginLimiter:
    """At most `failures` failed logins per key (user, address) in a sliding window.

    In memory: one identity replica answers a user's logins in the local default; with several
    replicas the limit holds per replica (documented)."""

    failures: int
    window_seconds: float
    _seen: dict[str, deque[float]] = field(default_factory=dict)

    def _recent(self, key: str, now: float) -> deque[float]:
        seen = self._seen.setdefault(key, deque())
        while seen and seen[0] <= now - self.window_seconds:
            seen.popleft()
        return seen

    def check(self, keys: Iterable[str], now: float | None = None) -> None:
        t = time.monotonic() if now is None else now
        for key in keys:
            seen = self._recent(key, t)
            if len(seen) >= self.failures:
                wait = seen[0] + self.window_seconds - t
                raise Refused("limited", f"too many failed logins; try again in {wait:.0f} s")

    def failed(self, keys: Iterable[str], now: float | None = None) -> None:
        t = time.monotonic() if now is None else now
        for key in keys:
            self._recent(key, t).append(t)

    def succeeded(self, user_key: str) -> None:
        self._seen.pop(user_key, None)


def login_keys(user_id: str, address: str) -> list[str]:
    return [f"user:{user_id}"] + ([f"addr:{address}"] if address else [])
