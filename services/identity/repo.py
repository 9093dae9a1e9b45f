"""SQL of the identity service (schema `identity`)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from services.common.auth import Role

SCHEMA = "identity"


@dataclass(frozen=True)
class UserRow:
    user_id: str
    role: Role
    display_name: str
    password_hash: str | None
    disabled: bool
    created_at: datetime
    project_ids: tuple[str, ...]


@dataclass(frozen=True)
class TokenRow:
    token_id: str
    user_id: str
    digest: str
    name: str
    session: bool
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None


_USER_SELECT = (
    "SELECT u.*, coalesce(array_agg(m.project_id ORDER BY m.project_id)"
    " FILTER (WHERE m.project_id IS NOT NULL), '{}') AS project_ids"
    " FROM identity.users u LEFT JOIN identity.memberships m USING (user_id)"
)


def _user(r: asyncpg.Record) -> UserRow:
    return UserRow(
        user_id=r["user_id"],
        role=Role(r["role"]),
        display_name=r["display_name"],
        password_hash=r["password_hash"],
        disabled=r["disabled"],
        created_at=r["created_at"],
        project_ids=tuple(r["project_ids"]),
    )


def _token(r: asyncpg.Record) -> TokenRow:
    return TokenRow(
        token_id=str(r["token_id"]),
        user_id=r["user_id"],
        digest=r["digest"],
        name=r["name"],
        session=r["session"],
        created_at=r["created_at"],
        expires_at=r["expires_at"],
        revoked_at=r["revoked_at"],
    )


async def get_user(conn: asyncpg.Connection, user_id: str) -> UserRow | None:
    row = await conn.fetchrow(_USER_SELECT + " WHERE u.user_id = $1 GROUP BY u.user_id", user_id)
    return _user(row) if row is not None else None


async def list_users(conn: asyncpg.Connection, project_id: str = "") -> list[UserRow]:
    if project_id:
        rows = await conn.fetch(
            _USER_SELECT
            + " WHERE u.user_id IN (SELECT user_id FROM identity.memberships WHERE project_id = $1)"
            " GROUP BY u.user_id ORDER BY u.user_id",
            project_id,
        )
    else:
        rows = await conn.fetch(_USER_SELECT + " GROUP BY u.user_id ORDER BY u.user_id")
    return [_user(r) for r in rows]


async def has_admin(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM identity.users WHERE role = 'admin')"))


async def insert_user(
    conn: asyncpg.Connection,
    user_id: str,
    role: Role,
    display_name: str,
    password_hash: str | None,
) -> bool:
    """False when the user exists already."""
    result = await conn.execute(
        "INSERT INTO identity.users (user_id, role, display_name, password_hash) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (user_id) DO NOTHING",
        user_id,
        role.value,
        display_name,
        password_hash,
    )
    return str(result).endswith(" 1")


async def update_user(
    conn: asyncpg.Connection,
    user_id: str,
    *,
    role: Role | None,
    password_hash: str | None,
    disabled: bool | None,
) -> None:
    await conn.execute(
        "UPDATE identity.users SET role = coalesce($2, role), password_hash = coalesce($3, password_hash),"
        " disabled = coalesce($4, disabled) WHERE user_id = $1",
        user_id,
        role.value if role is not None else None,
        password_hash,
        disabled,
    )


async def add_members(
    conn: asyncpg.Connection, project_id: str, user_ids: Sequence[str], added_by: str
) -> None:
    await conn.execute(
        "INSERT INTO identity.memberships (project_id, user_id, added_by)"
        " SELECT $1, u, $3 FROM unnest($2::text[]) AS u ON CONFLICT DO NOTHING",
        project_id,
        list(user_ids),
        added_by,
    )


async def remove_member(conn: asyncpg.Connection, project_id: str, user_id: str) -> None:
    await conn.execute(
        "DELETE FROM identity.memberships WHERE project_id = $1 AND user_id = $2", project_id, user_id
    )


async def insert_token(
    conn: asyncpg.Connection,
    user_id: str,
    digest: str,
    name: str,
    *,
    session: bool,
    expires_at: datetime,
) -> TokenRow:
    row = await conn.fetchrow(
        "INSERT INTO identity.tokens (token_id, user_id, digest, name, session, expires_at)"
        " VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
        uuid.uuid4(),
        user_id,
        digest,
        name,
        session,
        expires_at,
    )
    assert row is not None
    return _token(row)


async def get_token(conn: asyncpg.Connection, token_id: str) -> TokenRow | None:
    row = await conn.fetchrow("SELECT * FROM identity.tokens WHERE token_id = $1", uuid.UUID(token_id))
    return _token(row) if row is not None else None


async def list_tokens(conn: asyncpg.Connection, user_id: str) -> list[TokenRow]:
    rows = await conn.fetch(
        "SELECT * FROM identity.tokens WHERE user_id = $1 AND (NOT session OR (revoked_at IS NULL"
        " AND expires_at > now())) ORDER BY created_at DESC",
        user_id,
    )
    return [_token(r) for r in rows]


async def revoke_token(conn: asyncpg.Connection, token_id: str) -> None:
    await conn.execute(
        "UPDATE identity.tokens SET revoked_at = coalesce(revoked_at, now()) WHERE token_id = $1",
        uuid.UUID(token_id),
    )


async def live_tokens(conn: asyncpg.Connection) -> list[TokenRow]:
    rows = await conn.fetch("SELECT * FROM identity.tokens WHERE revoked_at IS NULL AND expires_at > now()")
    return [_token(r) for r in rows]


async def dead_token_digests(conn: asyncpg.Connection) -> list[str]:
    """Revoked or expired tokens (their grants are purged from the bucket at start)."""
    rows = await conn.fetch(
        "SELECT digest FROM identity.tokens WHERE revoked_at IS NOT NULL OR expires_at <= now()"
    )
    return [r["digest"] for r in rows]


def utc_now() -> datetime:
    return datetime.now(UTC)
