"""Who is calling, and may they? The one access check every gRPC service runs.

Tokens are opaque random strings. No service but identity has a token table: identity
publishes, per token, `token.<sha256(token)>` → TokenGrant and, per user, `user.<id>` →
Principal (role, memberships) into the `tandem_identity` key-value bucket. `AuthInterceptor`
reads both on every call (two direct gets on the local NATS, well under a millisecond), so a
revoked token, a disabled user or a removed membership stops working from the next call on;
a cached or signed token would keep working until it expired.

Decisions:
- no credential, an unknown, expired or revoked token, a disabled user → UNAUTHENTICATED;
- an action the role does not allow, or a project the user is not a member of → PERMISSION_DENIED;
- a method with no rule → PERMISSION_DENIED (deny by default; a unit test checks that every
  method in proto/ has one); health checks are open.
Handlers read the caller with `caller()`; what the interceptor cannot see from the request
(the project of a task or of an export) they check with `require_project`.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import grpc
import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from services.common.bus.topology import IDENTITY_BUCKET, PROJECTS_BUCKET
from services.common.grpc_context import Context
from services.common.grpc_wrap import wrap
from services.gen.tandem.identity.v1 import identity_pb2
from services.gen.tandem.projects.v1 import projects_pb2

TOKEN_PREFIX = "tdm_"
METADATA_KEY = "authorization"


class Role(StrEnum):
    ADMIN = "admin"
    MANAGER = "manager"
    REVIEWER = "reviewer"
    ANNOTATOR = "annotator"
    VIEWER = "viewer"
    VENDOR = "vendor"

    @classmethod
    def from_proto(cls, value: int) -> Role:
        return _ROLE_OF_PROTO[value]

    def to_proto(self) -> identity_pb2.Role.ValueType:
        return _PROTO_OF_ROLE[self]


_PROTO_OF_ROLE: dict[Role, identity_pb2.Role.ValueType] = {
    Role.ADMIN: identity_pb2.ROLE_ADMIN,
    Role.MANAGER: identity_pb2.ROLE_MANAGER,
    Role.REVIEWER: identity_pb2.ROLE_REVIEWER,
    Role.ANNOTATOR: identity_pb2.ROLE_ANNOTATOR,
    Role.VIEWER: identity_pb2.ROLE_VIEWER,
    Role.VENDOR: identity_pb2.ROLE_VENDOR,
}
_ROLE_OF_PROTO: dict[int, Role] = {int(v): k for k, v in _PROTO_OF_ROLE.items()}


class Action(StrEnum):
    READ = "read"  # project definitions and stats
    LABEL = "label"  # take tasks and label them
    CREATE_PROJECT = "create_project"
    EDIT_PROJECT = "edit_project"
    INGEST = "ingest"
    EXPORT = "export"
    GENERATE = "generate"  # synthetic examples
    MANAGE_MEMBERS = "manage_members"
    MANAGE_USERS = "manage_users"
    MANAGE_WORKFORCE = "manage_workforce"  # pools, people's pools and skills, pauses
    VENDOR_LABEL = "vendor_label"  # claim and submit for a pool's workers (vendor API)
    SELF = "self"  # who am I, my tokens, log out


ROLE_ACTIONS: dict[Role, frozenset[Action]] = {
    Role.ADMIN: frozenset(Action),
    Role.MANAGER: frozenset(
        {
            Action.READ,
            Action.LABEL,
            Action.CREATE_PROJECT,
            Action.EDIT_PROJECT,
            Action.INGEST,
            Action.EXPORT,
            Action.GENERATE,
            Action.MANAGE_MEMBERS,
            Action.MANAGE_WORKFORCE,
            Action.SELF,
        }
    ),
    Role.REVIEWER: frozenset({Action.READ, Action.LABEL, Action.SELF}),
    Role.ANNOTATOR: frozenset({Action.READ, Action.LABEL, Action.SELF}),
    Role.VIEWER: frozenset({Action.READ, Action.SELF}),
    # Not LABEL: a vendor account labels only as its workers, through the vendor API.
    Role.VENDOR: frozenset({Action.READ, Action.VENDOR_LABEL, Action.SELF}),
}


@dataclass(frozen=True)
class Principal:
    user_id: str
    role: Role
    project_ids: frozenset[str]
    token_id: str = ""
    session: bool = False
    display_name: str = ""

    def may(self, action: Action) -> bool:
        return action in ROLE_ACTIONS[self.role]

    def member_of(self, project_id: str) -> bool:
        return self.role is Role.ADMIN or project_id in self.project_ids


@dataclass(frozen=True)
class Rule:
    """What a method needs: an action (None = open to anyone) and, where the request names its
    project in a top-level field, that field, checked here before the handler runs."""

    action: Action | None
    project_field: str | None = None


OPEN = Rule(None)
_I, _R, _X = (
    "/tandem.ingest.v1.IngestService/",
    "/tandem.review.v1.ReviewService/",
    "/tandem.export.v1.ExportService/",
)
_ID = "/tandem.identity.v1.IdentityService/"
_W = "/tandem.workforce.v1.WorkforceService/"
RULES: dict[str, Rule] = {
    _I + "CreateProject": Rule(Action.CREATE_PROJECT),
    _I + "UpdateProject": Rule(Action.EDIT_PROJECT, "project_id"),
    _I + "GetProject": Rule(Action.READ, "project_id"),
    _I + "ListProjects": Rule(Action.READ),  # the handler lists the caller's projects only
    _I + "SubmitBatch": Rule(Action.INGEST, "project_id"),
    _I + "BulkSubmit": Rule(Action.INGEST),  # the handler checks each message's project
    "/tandem.inference.v1.InferenceService/GenerateExamples": Rule(Action.GENERATE, "project_id"),
    "/tandem.stats.v1.StatsService/GetProjectStats": Rule(Action.READ, "project_id"),
    _R + "NextTask": Rule(Action.LABEL, "project_id"),
    # The task's lease is the check: only its holder may label, skip or extend it.
    _R + "SubmitLabel": Rule(Action.LABEL),
    _R + "SkipTask": Rule(Action.LABEL),
    _R + "ExtendLease": Rule(Action.LABEL),
    _R + "ClaimBatch": Rule(Action.VENDOR_LABEL, "project_id"),
    _R + "SubmitBatch": Rule(Action.VENDOR_LABEL),  # each lease is the check, as in SubmitLabel
    _W + "PutPool": Rule(Action.MANAGE_WORKFORCE),
    _W + "ListPools": Rule(Action.READ),
    _W + "PutAnnotator": Rule(Action.MANAGE_WORKFORCE),
    _W + "ListAnnotators": Rule(Action.READ),
    _W + "SetPaused": Rule(Action.MANAGE_WORKFORCE, "project_id"),
    _W + "AddGold": Rule(Action.EDIT_PROJECT, "project_id"),
    _W + "GetQuality": Rule(Action.READ, "project_id"),
    _X + "CreateExport": Rule(Action.EXPORT, "project_id"),
    _X + "GetExport": Rule(Action.EXPORT),  # the handler checks the export's project
    _X + "StreamExport": Rule(Action.EXPORT),
    _X + "ListExports": Rule(Action.EXPORT, "project_id"),
    # A report publishes flags the scorer acts on: those who may export may ask for one.
    "/tandem.export.v1.ReportService/GetReport": Rule(Action.EXPORT, "project_id"),
    _ID + "Login": OPEN,
    _ID + "Logout": Rule(Action.SELF),
    _ID + "WhoAmI": Rule(Action.SELF),
    _ID + "CreateUser": Rule(Action.MANAGE_USERS),
    _ID + "UpdateUser": Rule(Action.MANAGE_USERS),
    _ID + "ListUsers": Rule(Action.MANAGE_MEMBERS),
    _ID + "AddMember": Rule(Action.MANAGE_MEMBERS, "project_id"),
    _ID + "RemoveMember": Rule(Action.MANAGE_MEMBERS, "project_id"),
    _ID + "ListMembers": Rule(Action.READ, "project_id"),
    _ID + "CreateToken": Rule(Action.SELF),  # for someone else: admin, checked in the handler
    _ID + "ListTokens": Rule(Action.SELF),
    _ID + "RevokeToken": Rule(Action.SELF),
}
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """Tokens carry 256 random bits, so a plain SHA-256 is a safe lookup key (no salt or slow
    hash needed, unlike passwords)."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_key(digest: str) -> str:
    return f"token.{digest}"


def user_key(user_id: str) -> str:
    return f"user.{user_id}"


_CALLER: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("tandem_caller", default=None)


def caller() -> Principal:
    """The principal of the gRPC call being handled (set by AuthInterceptor)."""
    principal = _CALLER.get()
    if principal is None:
        raise RuntimeError("no authenticated caller: is the AuthInterceptor installed?")
    return principal


def caller_token(context: Context) -> str:
    """The caller's own bearer token, for calls made on their behalf."""
    return _bearer(context.invocation_metadata() or ()) or ""


class IdentityView:
    """Read side of the identity bucket: token → grant → principal, on every call."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._kv: KeyValue | None = None
        self._projects: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self._js.key_value(IDENTITY_BUCKET)
        return self._kv

    async def _get(self, kv: KeyValue, key: str) -> bytes | None:
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return None
        return entry.value or None

    async def resolve(self, token: str) -> Principal | None:
        kv = await self._bucket()
        raw = await self._get(kv, token_key(token_digest(token)))
        if raw is None:
            return None
        grant = identity_pb2.TokenGrant.FromString(raw)
        if grant.expires_unix_ms and grant.expires_unix_ms < time.time() * 1000:
            return None
        raw_user = await self._get(kv, user_key(grant.user_id))
        if raw_user is None:
            return None
        user = identity_pb2.Principal.FromString(raw_user)
        if user.disabled or user.role not in _ROLE_OF_PROTO:
            return None
        return Principal(
            user_id=user.user_id,
            role=Role.from_proto(user.role),
            project_ids=frozenset(user.project_ids),
            token_id=grant.token_id,
            session=grant.session,
            display_name=user.display_name,
        )

    async def creator(self, project_id: str) -> str:
        """Who created a project: its creator is a member from the first moment, before any
        membership has been written."""
        if self._projects is None:
            self._projects = await self._js.key_value(PROJECTS_BUCKET)
        raw = await self._get(self._projects, project_id)
        return "" if raw is None else projects_pb2.Project.FromString(raw).created_by


async def may_access(view: IdentityView, principal: Principal, project_id: str) -> bool:
    if principal.member_of(project_id):
        return True
    return bool(project_id) and await view.creator(project_id) == principal.user_id


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Authenticates and authorizes every call before its handler runs.

    Created with the server (before NATS is connected) and bound to JetStream at start-up."""

    def __init__(self, rules: dict[str, Rule] | None = None) -> None:
        self._rules = RULES if rules is None else rules
        self._view: IdentityView | None = None

    def bind(self, js: JetStreamContext) -> None:
        self._view = IdentityView(js)

    @property
    def view(self) -> IdentityView:
        assert self._view is not None, "AuthInterceptor used before bind()"
        return self._view

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        rule = self._rules.get(method)
        if rule is OPEN:
            return handler
        token = _bearer(handler_call_details.invocation_metadata or ())

        @contextlib.asynccontextmanager
        async def check(request: Any, context: Context) -> AsyncIterator[None]:
            principal = await self._authorize(method, rule, token, request, context)
            _CALLER.set(principal)
            yield

        return wrap(handler, check)

    async def _authorize(
        self, method: str, rule: Rule | None, token: str | None, request: Any, context: Context
    ) -> Principal:
        if not token:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "no credentials: send 'authorization: Bearer <token>'"
            )
        assert token is not None
        try:
            principal = await self.view.resolve(token)
        except (nats.errors.Error, TimeoutError) as exc:
            # NATS restarting: the caller's client retries UNAVAILABLE (its service config says so).
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot check the token right now: {exc!r}")
            raise  # unreachable: abort raises
        if principal is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the token is unknown, expired or revoked")
        assert principal is not None
        if rule is None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{method} has no access rule")
        assert rule is not None and rule.action is not None
        if not principal.may(rule.action):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"a {principal.role} may not {rule.action.replace('_', ' ')}",
            )
        if rule.project_field is not None and request is not None:
            project_id = getattr(request, rule.project_field)
            if not await may_access(self.view, principal, project_id):
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{principal.user_id} is not a member of {project_id!r}",
                )
        return principal


async def require_project(context: Context, project_id: str, view: IdentityView) -> None:
    """For handlers whose project is not a request field (a task's, an export's)."""
    if not await may_access(view, caller(), project_id):
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED, f"{caller().user_id} is not a member of {project_id!r}"
        )


def _bearer(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    for key, value in metadata:
        if key == METADATA_KEY:
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, credential = text.partition(" ")
            if scheme.lower() == "bearer" and credential:
                return credential.strip()
    return None


class _Bearer:
    def __init__(self, token: str) -> None:
        self._header = (METADATA_KEY, f"Bearer {token}")

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata: Sequence[tuple[str, str | bytes]] = tuple(details.metadata or ())
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*metadata, self._header),
            details.credentials,
            details.wait_for_ready,
        )


class _UnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _UnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _StreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _StreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


def bearer_interceptors(token: str) -> list[Any]:
    """Client side: `authorization: Bearer <token>` on every call of a channel. One object per
    call kind: grpc.aio files an interceptor under the first kind it implements only."""
    return [cls(token) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]
