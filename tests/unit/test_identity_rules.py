"""Identity's pure rules: names, passwords, the login rate limit, who may act for whom."""

from __future__ import annotations

import pytest

from services.common.auth import Principal, Role, new_token, token_digest
from services.identity.service import (
    LoginLimiter,
    Refused,
    check_password,
    check_user_id,
    hash_password,
    login_keys,
    may_act_for,
    token_ttl,
    verify_password,
)


@pytest.mark.parametrize("user_id", ["alice", "sim-01", "a.b_c", "0"])
def test_valid_user_ids(user_id: str) -> None:
    assert check_user_id(user_id) == user_id


@pytest.mark.parametrize("user_id", ["", "Alice", "-x", "a b", "a/b", "x" * 64])
def test_invalid_user_ids(user_id: str) -> None:
    with pytest.raises(Refused) as refused:
        check_user_id(user_id)
    assert refused.value.code == "invalid"


def test_passwords_are_argon2id_and_checked() -> None:
    stored = hash_password("correct horse battery")
    assert stored.startswith("$argon2id$")
    assert verify_password(stored, "correct horse battery")
    assert not verify_password(stored, "correct horse batterY")
    assert not verify_password(None, "anything")
    assert not verify_password("not a hash", "anything")
    with pytest.raises(Refused):
        check_password("short", 10)


def test_login_limiter_counts_failures_per_key_in_a_window() -> None:
    limiter = LoginLimiter(failures=3, window_seconds=60)
    keys = login_keys("ann", "10.0.0.1")
    for t in range(3):
        limiter.check(keys, now=t)
        limiter.failed(keys, now=t)
    with pytest.raises(Refused) as refused:
        limiter.check(keys, now=10)
    assert refused.value.code == "limited"
    # Another user from another address is not held back…
    limiter.check(login_keys("bob", "10.0.0.2"), now=10)
    # …but the same address is, whichever user it tries.
    with pytest.raises(Refused):
        limiter.check(login_keys("bob", "10.0.0.1"), now=10)
    # The window slides.
    limiter.check(keys, now=61)


def test_success_clears_the_users_failures_but_not_the_addresss() -> None:
    limiter = LoginLimiter(failures=2, window_seconds=60)
    keys = login_keys("ann", "10.0.0.1")
    limiter.failed(keys, now=0)
    limiter.succeeded(keys[0])
    limiter.failed(keys, now=1)
    limiter.check(login_keys("ann", "10.0.0.9"), now=2)
    with pytest.raises(Refused):
        limiter.check(login_keys("other", "10.0.0.1"), now=2)


def test_only_admins_act_for_others() -> None:
    ann = Principal("ann", Role.ANNOTATOR, frozenset())
    may_act_for(ann, "ann")
    with pytest.raises(Refused):
        may_act_for(ann, "bob")
    may_act_for(Principal("root", Role.ADMIN, frozenset()), "bob")


def test_token_lifetimes_are_bounded() -> None:
    assert token_ttl(0, 100, 1000) == 100
    assert token_ttl(5000, 100, 1000) == 1000
    with pytest.raises(Refused):
        token_ttl(-1, 100, 1000)


def test_tokens_are_random_and_stored_as_digests() -> None:
    a, b = new_token(), new_token()
    assert a != b and a.startswith("tdm_") and len(a) > 40
    assert token_digest(a) != a and len(token_digest(a)) == 64
