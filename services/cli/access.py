"""`tandem login|logout|whoami|user|member|token`, and where the CLI finds its token.

The token comes from `--token`, else `TANDEM_TOKEN`, else the file `tandem login` (or `tandem
up`, for the admin it creates) writes into the state dir, mode 0600.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
import secrets
import socket
from pathlib import Path

from services.cli.client import Clients
from services.cli.commands import console
from services.cli.files import InputError
from services.gen.tandem.identity.v1 import identity_pb2

TOKEN_FILE = "token"
ROLES = {
    "admin": identity_pb2.ROLE_ADMIN,
    "manager": identity_pb2.ROLE_MANAGER,
    "reviewer": identity_pb2.ROLE_REVIEWER,
    "annotator": identity_pb2.ROLE_ANNOTATOR,
    "viewer": identity_pb2.ROLE_VIEWER,
    "vendor": identity_pb2.ROLE_VENDOR,
}
ROLE_NAMES = {v: k for k, v in ROLES.items()}


def write_token(state_dir: Path, token: str) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / TOKEN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return path


def resolve_token(state_dir: Path, flag: str | None = None) -> str | None:
    if flag:
        return flag
    if os.environ.get("TANDEM_TOKEN"):
        return os.environ["TANDEM_TOKEN"]
    path = state_dir / TOKEN_FILE
    return path.read_text().strip() if path.exists() else None


def _when(ms: int) -> str:
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


async def login(clients: Clients, state_dir: Path, user_id: str, ttl_days: float) -> None:
    """Password → a session → an API token for this machine (the session is closed again)."""
    password = getpass.getpass(f"password for {user_id}: ")
    session = await clients.identity.Login(
        identity_pb2.LoginRequest(user_id=user_id, password=password, session_seconds=60), timeout=30
    )
    async with Clients(clients.targets, token=session.token) as mine:
        made = await mine.identity.CreateToken(
            identity_pb2.CreateTokenRequest(name=f"cli@{socket.gethostname()}", ttl_seconds=ttl_days * 86400),
            timeout=30,
        )
        await mine.identity.Logout(identity_pb2.LogoutRequest(), timeout=30)
    path = write_token(state_dir, made.token)
    console.print(
        f"logged in as [bold]{user_id}[/]; token saved in {path} (expires {_when(made.info.expires_unix_ms)})"
    )


async def logout(clients: Clients, state_dir: Path) -> None:
    me = await clients.identity.WhoAmI(identity_pb2.WhoAmIRequest(), timeout=30)
    await clients.identity.Logout(identity_pb2.LogoutRequest(), timeout=30)
    (state_dir / TOKEN_FILE).unlink(missing_ok=True)
    console.print(f"logged out {me.user_id}; the token is revoked")


async def whoami(clients: Clients) -> None:
    me = await clients.identity.WhoAmI(identity_pb2.WhoAmIRequest(), timeout=30)
    projects = ", ".join(me.project_ids) or (
        "every project" if me.role == identity_pb2.ROLE_ADMIN else "none"
    )
    console.print(f"{me.user_id} ({ROLE_NAMES.get(me.role, '?')}), projects: {projects}")


async def add_user(
    clients: Clients, user_id: str, role: str, projects: list[str], password: str | None
) -> None:
    if role not in ROLES:
        raise InputError(f"role must be one of {', '.join(ROLES)}")
    generated = password is None
    chosen = secrets.token_urlsafe(12) if password is None else password
    user = await clients.identity.CreateUser(
        identity_pb2.CreateUserRequest(
            user_id=user_id, role=ROLES[role], password=chosen, project_ids=projects
        ),
        timeout=30,
    )
    console.print(
        f"user [bold]{user.user_id}[/] ({role}) created; projects: {', '.join(user.project_ids) or '-'}"
    )
    if generated:
        console.print(f"password: [bold]{chosen}[/] (shown once)")


async def list_users(clients: Clients, project: str) -> None:
    users = await clients.identity.ListUsers(identity_pb2.ListUsersRequest(project_id=project), timeout=30)
    for u in users.users:
        state = " disabled" if u.disabled else ""
        console.print(f"{u.user_id}\t{ROLE_NAMES.get(u.role, '?')}{state}\t{', '.join(u.project_ids) or '-'}")


async def disable_user(clients: Clients, user_id: str, disabled: bool) -> None:
    await clients.identity.UpdateUser(
        identity_pb2.UpdateUserRequest(user_id=user_id, set_disabled=True, disabled=disabled), timeout=30
    )
    console.print(f"{user_id} {'disabled' if disabled else 'enabled'}")


async def member(clients: Clients, project: str, user_id: str, remove: bool) -> None:
    if remove:
        await clients.identity.RemoveMember(
            identity_pb2.RemoveMemberRequest(project_id=project, user_id=user_id), timeout=30
        )
        console.print(f"{user_id} is no longer a member of {project}")
    else:
        await clients.identity.AddMember(
            identity_pb2.AddMemberRequest(project_id=project, user_id=user_id), timeout=30
        )
        console.print(f"{user_id} is a member of {project}")


async def create_token(clients: Clients, user_id: str, name: str, ttl_days: float) -> None:
    made = await clients.identity.CreateToken(
        identity_pb2.CreateTokenRequest(user_id=user_id, name=name, ttl_seconds=ttl_days * 86400), timeout=30
    )
    console.print(
        f"token {made.info.token_id} for {made.info.user_id}, expires {_when(made.info.expires_unix_ms)}:"
    )
    console.print(made.token, soft_wrap=True)


async def list_tokens(clients: Clients, user_id: str) -> None:
    tokens = await clients.identity.ListTokens(identity_pb2.ListTokensRequest(user_id=user_id), timeout=30)
    for t in tokens.tokens:
        state = (
            f"revoked {_when(t.revoked_unix_ms)}"
            if t.revoked_unix_ms
            else f"expires {_when(t.expires_unix_ms)}"
        )
        kind = "session" if t.session else "api"
        console.print(f"{t.token_id}\t{t.user_id}\t{kind}\t{t.name or '-'}\t{state}")


async def revoke_token(clients: Clients, token_id: str) -> None:
    await clients.identity.RevokeToken(identity_pb2.RevokeTokenRequest(token_id=token_id), timeout=30)
    console.print(f"token {token_id} revoked")
