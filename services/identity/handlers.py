"""gRPC edge of the identity service: PostgreSQL first, then the bucket every service reads."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from datetime import datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
from prometheus_client import Counter

from services.common.auth import Principal, Role, caller, new_token, token_digest
from services.common.errors import UnknownProject
from services.common.grpc_context import Context
from services.common.projects import ProjectDirectory
from services.gen.tandem.identity.v1 import identity_pb2, identity_pb2_grpc
from services.identity import repo
from services.identity.bucket import IdentityBucket
from services.identity.repo import TokenRow, UserRow
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
from services.identity.settings import IdentitySettings

log = logging.getLogger(__name__)

LOGINS = Counter("tandem_identity_logins_total", "Login attempts by outcome.", ["outcome"])
_STATUS = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "denied": grpc.StatusCode.PERMISSION_DENIED,
    "limited": grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def _ms(t: datetime | None) -> int:
    return int(t.timestamp() * 1000) if t is not None else 0


def _user_message(u: UserRow) -> identity_pb2.User:
    return identity_pb2.User(
        user_id=u.user_id,
        role=u.role.to_proto(),
        display_name=u.display_name,
        disabled=u.disabled,
        project_ids=list(u.project_ids),
        created_unix_ms=_ms(u.created_at),
    )


def _token_message(t: TokenRow) -> identity_pb2.TokenInfo:
    return identity_pb2.TokenInfo(
        token_id=t.token_id,
        user_id=t.user_id,
        name=t.name,
        created_unix_ms=_ms(t.created_at),
        expires_unix_ms=_ms(t.expires_at),
        revoked_unix_ms=_ms(t.revoked_at),
        session=t.session,
    )


def _principal_message(p: Principal) -> identity_pb2.Principal:
    return identity_pb2.Principal(
        user_id=p.user_id,
        role=p.role.to_proto(),
        project_ids=sorted(p.project_ids),
        display_name=p.display_name,
    )


class Directory:
    """Users and tokens: every change is committed, then published to the bucket."""

    def __init__(self, pool: asyncpg.Pool, bucket: IdentityBucket, settings: IdentitySettings) -> None:
        self.pool = pool
        self.bucket = bucket
        self.settings = settings

    async def publish_user(self, conn: asyncpg.Connection, user_id: str) -> UserRow:
        user = await repo.get_user(conn, user_id)
        assert user is not None
        await self.bucket.put_principal(
            user.user_id, user.role, user.project_ids, disabled=user.disabled, display_name=user.display_name
        )
        return user

    async def issue(
        self, user_id: str, name: str, ttl_seconds: float, *, session: bool
    ) -> tuple[str, TokenRow]:
        token = new_token()
        digest = token_digest(token)
        expires = repo.utc_now() + timedelta(seconds=ttl_seconds)
        async with self.pool.acquire() as conn:
            row = await repo.insert_token(conn, user_id, digest, name, session=session, expires_at=expires)
        await self.bucket.put_grant_digest(digest, row.token_id, user_id, _ms(expires), session=session)
        return token, row

    async def revoke(self, token: TokenRow) -> None:
        async with self.pool.acquire() as conn:
            await repo.revoke_token(conn, token.token_id)
        await self.bucket.drop_grant_digest(token.digest)

    async def republish(self) -> None:
        """The bucket from PostgreSQL: at every start, so a lost or new bucket is rebuilt."""
        async with self.pool.acquire() as conn:
            users = await repo.list_users(conn)
            live = await repo.live_tokens(conn)
            dead = await repo.dead_token_digests(conn)
        for u in users:
            await self.bucket.put_principal(
                u.user_id, u.role, u.project_ids, disabled=u.disabled, display_name=u.display_name
            )
        for t in live:
            await self.bucket.put_grant_digest(
                t.digest, t.token_id, t.user_id, _ms(t.expires_at), session=t.session
            )
        for digest in dead:
            await self.bucket.drop_grant_digest(digest)
        log.info("identity published: %d users, %d live tokens", len(users), len(live))

    async def bootstrap(self, path: Path) -> None:
        """First start: an admin with a generated password and an API token, written for `tandem up`."""
        async with self.pool.acquire() as conn:
            if await repo.has_admin(conn):
                return
            password = secrets.token_urlsafe(12)
            pw_hash = await asyncio.to_thread(hash_password, password)
            if not await repo.insert_user(conn, "admin", Role.ADMIN, "Administrator", pw_hash):
                return  # another replica starting at the same moment made it (and wrote the file)
            await self.publish_user(conn, "admin")
        token, _row = await self.issue("admin", "bootstrap", self.settings.token_ttl_seconds, session=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"user_id": "admin", "password": password, "token": token}, f, indent=2)
        log.info("created the admin user; its login and token are in %s", path)


class IdentityServicer(identity_pb2_grpc.IdentityServiceServicer):
    def __init__(self, directory: Directory, projects: ProjectDirectory) -> None:
        self._d = directory
        self._projects = projects
        s = directory.settings
        self._limiter = LoginLimiter(s.login_failures, s.login_window_seconds)

    async def _refuse(self, context: Context, refused: Refused) -> None:
        await context.abort(_STATUS[refused.code], str(refused))

    async def _password_hash(self, password: str, context: Context) -> str | None:
        """argon2 of a new password that meets the policy (in a thread: it is slow on purpose)."""
        if not password:
            return None
        try:
            check_password(password, self._d.settings.min_password_length)
        except Refused as refused:
            await self._refuse(context, refused)
        return await asyncio.to_thread(hash_password, password)

    async def Login(self, request: identity_pb2.LoginRequest, context: Context) -> identity_pb2.LoginResponse:
        keys = login_keys(request.user_id, request.client_address or (context.peer() or ""))
        try:
            self._limiter.check(keys)
        except Refused as refused:
            LOGINS.labels("limited").inc()
            await self._refuse(context, refused)
        async with self._d.pool.acquire() as conn:
            user = await repo.get_user(conn, request.user_id)
        ok = await asyncio.to_thread(verify_password, user.password_hash if user else None, request.password)
        if user is None or not ok or user.disabled:
            self._limiter.failed(keys)
            LOGINS.labels("failed").inc()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong user or password")
        assert user is not None
        self._limiter.succeeded(keys[0])
        LOGINS.labels("ok").inc()
        ttl = token_ttl(
            request.session_seconds, self._d.settings.session_seconds, self._d.settings.session_seconds
        )
        token, row = await self._d.issue(user.user_id, "session", ttl, session=True)
        principal = Principal(
            user.user_id, user.role, frozenset(user.project_ids), display_name=user.display_name
        )
        return identity_pb2.LoginResponse(
            token=token, principal=_principal_message(principal), expires_unix_ms=_ms(row.expires_at)
        )

    async def Logout(
        self, request: identity_pb2.LogoutRequest, context: Context
    ) -> identity_pb2.LogoutResponse:
        async with self._d.pool.acquire() as conn:
            token = await repo.get_token(conn, caller().token_id)
        if token is not None:
            await self._d.revoke(token)
        return identity_pb2.LogoutResponse()

    async def WhoAmI(self, request: identity_pb2.WhoAmIRequest, context: Context) -> identity_pb2.Principal:
        return _principal_message(caller())

    async def CreateUser(
        self, request: identity_pb2.CreateUserRequest, context: Context
    ) -> identity_pb2.User:
        try:
            user_id = check_user_id(request.user_id)
            if request.role == identity_pb2.ROLE_UNSPECIFIED:
                raise Refused("invalid", "a user needs a role")
            role = Role.from_proto(request.role)
        except Refused as refused:
            await self._refuse(context, refused)
        pw_hash = await self._password_hash(request.password, context)
        for project_id in request.project_ids:
            await self._project_exists(project_id, context)
        async with self._d.pool.acquire() as conn, conn.transaction():
            if not await repo.insert_user(conn, user_id, role, request.display_name, pw_hash):
                await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"user {user_id!r} exists already")
            for project_id in request.project_ids:
                await repo.add_members(conn, project_id, [user_id], caller().user_id)
            user = await self._d.publish_user(conn, user_id)
        return _user_message(user)

    async def UpdateUser(
        self, request: identity_pb2.UpdateUserRequest, context: Context
    ) -> identity_pb2.User:
        role = Role.from_proto(request.role) if request.role != identity_pb2.ROLE_UNSPECIFIED else None
        pw_hash = await self._password_hash(request.password, context)
        async with self._d.pool.acquire() as conn, conn.transaction():
            if await repo.get_user(conn, request.user_id) is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no user {request.user_id!r}")
            await repo.update_user(
                conn,
                request.user_id,
                role=role,
                password_hash=pw_hash,
                disabled=request.disabled if request.set_disabled else None,
            )
            user = await self._d.publish_user(conn, request.user_id)
        return _user_message(user)

    async def ListUsers(
        self, request: identity_pb2.ListUsersRequest, context: Context
    ) -> identity_pb2.ListUsersResponse:
        async with self._d.pool.acquire() as conn:
            users = await repo.list_users(conn, request.project_id)
        return identity_pb2.ListUsersResponse(users=[_user_message(u) for u in users])

    async def _project_exists(self, project_id: str, context: Context) -> None:
        try:
            await self._projects.get(project_id)
        except UnknownProject:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no project {project_id!r}")

    async def AddMember(
        self, request: identity_pb2.AddMemberRequest, context: Context
    ) -> identity_pb2.AddMemberResponse:
        await self._project_exists(request.project_id, context)
        async with self._d.pool.acquire() as conn, conn.transaction():
            if await repo.get_user(conn, request.user_id) is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no user {request.user_id!r}")
            await repo.add_members(conn, request.project_id, [request.user_id], caller().user_id)
            await self._d.publish_user(conn, request.user_id)
        return identity_pb2.AddMemberResponse()

    async def RemoveMember(
        self, request: identity_pb2.RemoveMemberRequest, context: Context
    ) -> identity_pb2.RemoveMemberResponse:
        async with self._d.pool.acquire() as conn, conn.transaction():
            if await repo.get_user(conn, request.user_id) is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no user {request.user_id!r}")
            await repo.remove_member(conn, request.project_id, request.user_id)
            await self._d.publish_user(conn, request.user_id)
        return identity_pb2.RemoveMemberResponse()

    async def ListMembers(
        self, request: identity_pb2.ListMembersRequest, context: Context
    ) -> identity_pb2.ListMembersResponse:
        async with self._d.pool.acquire() as conn:
            users = await repo.list_users(conn, request.project_id)
        return identity_pb2.ListMembersResponse(members=[_user_message(u) for u in users])

    async def CreateToken(
        self, request: identity_pb2.CreateTokenRequest, context: Context
    ) -> identity_pb2.CreateTokenResponse:
        user_id = request.user_id or caller().user_id
        s = self._d.settings
        try:
            may_act_for(caller(), user_id)
            ttl = token_ttl(request.ttl_seconds, s.token_ttl_seconds, s.max_token_ttl_seconds)
        except Refused as refused:
            await self._refuse(context, refused)
        async with self._d.pool.acquire() as conn:
            if await repo.get_user(conn, user_id) is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no user {user_id!r}")
        token, row = await self._d.issue(user_id, request.name, ttl, session=False)
        return identity_pb2.CreateTokenResponse(token=token, info=_token_message(row))

    async def ListTokens(
        self, request: identity_pb2.ListTokensRequest, context: Context
    ) -> identity_pb2.ListTokensResponse:
        user_id = request.user_id or caller().user_id
        try:
            may_act_for(caller(), user_id)
        except Refused as refused:
            await self._refuse(context, refused)
        async with self._d.pool.acquire() as conn:
            tokens = await repo.list_tokens(conn, user_id)
        return identity_pb2.ListTokensResponse(tokens=[_token_message(t) for t in tokens])

    async def RevokeToken(
        self, request: identity_pb2.RevokeTokenRequest, context: Context
    ) -> identity_pb2.RevokeTokenResponse:
        try:
            async with self._d.pool.acquire() as conn:
                token = await repo.get_token(conn, request.token_id)
        except ValueError:
            token = None
        if token is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no token {request.token_id!r}")
        assert token is not None
        try:
            may_act_for(caller(), token.user_id)
        except Refused as refused:
            await self._refuse(context, refused)
        await self._d.revoke(token)
        return identity_pb2.RevokeTokenResponse()
