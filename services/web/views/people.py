"""Members of a project, API tokens, and users (admin)."""

from __future__ import annotations

import contextlib

import grpc
from aiohttp import web

from services.common.auth import Action, Role
from services.gen.tandem.identity.v1 import identity_pb2
from services.gen.tandem.ingest.v1 import ingest_pb2
from services.web.errors import bad_request, forbidden
from services.web.state import app_state, auth, principal, render
from services.web.views.manage import _project

ROLES = [role.value for role in Role]


def _require(request: web.Request, action: Action, what: str) -> None:
    who = principal(request)
    if not who.may(action):
        raise forbidden(f"A {who.role} may not {what}.")


async def _form(request: web.Request) -> dict[str, str]:
    posted = await request.post()
    return {k: v for k, v in posted.items() if isinstance(v, str)}


# --- members --------------------------------------------------------------------------------------


async def members(request: web.Request, *, error: str = "", status: int = 200) -> web.StreamResponse:
    project = await _project(request)
    identity = app_state(request).backends.identity
    listed = await identity.ListMembers(
        identity_pb2.ListMembersRequest(project_id=project.project_id), **auth(request)
    )
    candidates: list[str] = []
    if principal(request).may(Action.MANAGE_MEMBERS):
        # Suggestions for the add box only; a manager who may not list users types the id.
        with contextlib.suppress(grpc.aio.AioRpcError):
            users = await identity.ListUsers(identity_pb2.ListUsersRequest(), **auth(request))
            present = {m.user_id for m in listed.members}
            candidates = sorted(u.user_id for u in users.users if u.user_id not in present and not u.disabled)
    return render(
        request,
        "members.html",
        status=status,
        project=project,
        members=sorted(listed.members, key=lambda m: m.user_id),
        candidates=candidates,
        role_name=_role_name,
        error=error,
    )


async def members_page(request: web.Request) -> web.StreamResponse:
    return await members(request)


async def add_member(request: web.Request) -> web.StreamResponse:
    _require(request, Action.MANAGE_MEMBERS, "manage members")
    project_id = request.match_info["project_id"]
    user_id = (await _form(request)).get("user_id", "").strip()
    if not user_id:
        return await members(request, error="Enter a user id.", status=400)
    try:
        await app_state(request).backends.identity.AddMember(
            identity_pb2.AddMemberRequest(project_id=project_id, user_id=user_id), **auth(request)
        )
    except grpc.aio.AioRpcError as error:
        if error.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
            raise
        return await members(request, error=error.details() or "No such user.", status=400)
    raise web.HTTPSeeOther(f"/projects/{project_id}/members")


async def remove_member(request: web.Request) -> web.StreamResponse:
    _require(request, Action.MANAGE_MEMBERS, "manage members")
    project_id, user_id = request.match_info["project_id"], request.match_info["user_id"]
    await app_state(request).backends.identity.RemoveMember(
        identity_pb2.RemoveMemberRequest(project_id=project_id, user_id=user_id), **auth(request)
    )
    raise web.HTTPSeeOther(f"/projects/{project_id}/members")


# --- tokens ---------------------------------------------------------------------------------------


async def tokens(
    request: web.Request,
    *,
    created: identity_pb2.CreateTokenResponse | None = None,
    error: str = "",
    status: int = 200,
) -> web.StreamResponse:
    listed = await app_state(request).backends.identity.ListTokens(
        identity_pb2.ListTokensRequest(), **auth(request)
    )
    rows = sorted(listed.tokens, key=lambda t: t.created_unix_ms, reverse=True)
    return render(
        request,
        "tokens.html",
        status=status,
        tokens=[t for t in rows if not t.session],
        sessions=[t for t in rows if t.session],
        created=created,
        error=error,
    )


async def tokens_page(request: web.Request) -> web.StreamResponse:
    return await tokens(request)


async def create_token(request: web.Request) -> web.StreamResponse:
    form = await _form(request)
    name = form.get("name", "").strip()
    days_text = form.get("days", "").strip() or "0"
    if not name:
        return await tokens(request, error="Name the token after what will use it (e.g. 'ci').", status=400)
    try:
        days = float(days_text)
    except ValueError:
        return await tokens(request, error="Days must be a number.", status=400)
    if not 0 <= days <= 366:
        return await tokens(request, error="Days must be between 0 (the default) and 366.", status=400)
    created = await app_state(request).backends.identity.CreateToken(
        identity_pb2.CreateTokenRequest(name=name, ttl_seconds=days * 86400), **auth(request)
    )
    # Shown in this answer only (never stored by the app, and the page is no-store).
    return await tokens(request, created=created)


async def revoke_token(request: web.Request) -> web.StreamResponse:
    await app_state(request).backends.identity.RevokeToken(
        identity_pb2.RevokeTokenRequest(token_id=request.match_info["token_id"]), **auth(request)
    )
    raise web.HTTPSeeOther("/tokens")


# --- users (admin) --------------------------------------------------------------------------------


def _role_name(value: int) -> str:
    try:
        return Role.from_proto(value).value
    except KeyError:
        return "?"


async def users(
    request: web.Request, *, error: str = "", status: int = 200, form: dict[str, str] | None = None
) -> web.StreamResponse:
    _require(request, Action.MANAGE_USERS, "manage users")
    st = app_state(request)
    listed = await st.backends.identity.ListUsers(identity_pb2.ListUsersRequest(), **auth(request))
    project_ids: list[str] = []
    # Suggestions for the projects box only: the page works without them.
    with contextlib.suppress(grpc.aio.AioRpcError):
        projects = await st.backends.ingest.ListProjects(ingest_pb2.ListProjectsRequest(), **auth(request))
        project_ids = sorted(p.project_id for p in projects.projects)
    return render(
        request,
        "users.html",
        status=status,
        users=sorted(listed.users, key=lambda u: u.user_id),
        roles=ROLES,
        role_name=_role_name,
        project_ids=project_ids,
        form=form or {"user_id": "", "display_name": "", "role": "annotator", "projects": ""},
        error=error,
    )


async def users_page(request: web.Request) -> web.StreamResponse:
    return await users(request)


async def create_user(request: web.Request) -> web.StreamResponse:
    _require(request, Action.MANAGE_USERS, "manage users")
    form = await _form(request)
    role = form.get("role", "")
    if role not in ROLES:
        raise bad_request(f"The role must be one of {', '.join(ROLES)}.")
    project_ids = sorted({p.strip() for p in form.get("projects", "").replace(",", " ").split() if p.strip()})
    try:
        await app_state(request).backends.identity.CreateUser(
            identity_pb2.CreateUserRequest(
                user_id=form.get("user_id", "").strip(),
                role=Role(role).to_proto(),
                password=form.get("password", ""),
                display_name=form.get("display_name", "").strip(),
                project_ids=project_ids,
            ),
            **auth(request),
        )
    except grpc.aio.AioRpcError as error:
        if error.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS):
            raise
        form.pop("password", None)
        return await users(request, error=error.details() or "refused", status=400, form=form)
    raise web.HTTPSeeOther("/admin/users")


async def update_user(request: web.Request) -> web.StreamResponse:
    _require(request, Action.MANAGE_USERS, "manage users")
    form = await _form(request)
    user_id = request.match_info["user_id"]
    action = form.get("action", "")
    update = identity_pb2.UpdateUserRequest(user_id=user_id)
    if action in ("disable", "enable"):
        update.set_disabled, update.disabled = True, action == "disable"
    elif action == "role" and form.get("role") in ROLES:
        update.role = Role(form["role"]).to_proto()
    elif action == "password" and form.get("password"):
        update.password = form["password"]
    else:
        raise bad_request("Unknown change.")
    try:
        await app_state(request).backends.identity.UpdateUser(update, **auth(request))
    except grpc.aio.AioRpcError as error:
        if error.code() is not grpc.StatusCode.INVALID_ARGUMENT:
            raise
        return await users(request, error=error.details() or "refused", status=400)
    raise web.HTTPSeeOther("/admin/users")
