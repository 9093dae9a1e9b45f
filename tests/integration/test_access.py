"""Identity and access on the real services: every gRPC service refuses a call without a valid
token, refuses what a role may not do and projects a user is not a member of, and a revoked token
or a disabled user stops working on the very next call."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.cli.client import Clients
from services.cli.stack import Stack
from services.gen.tandem.export.v1 import export_pb2
from services.gen.tandem.identity.v1 import identity_pb2
from services.gen.tandem.ingest.v1 import ingest_pb2
from services.gen.tandem.projects.v1 import projects_pb2
from services.gen.tandem.review.v1 import review_pb2
from services.gen.tandem.stats.v1 import stats_pb2

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SERVICES = ("identity", "ingest", "scorer", "review", "export")
PASSWORD = "correct horse battery"


def _project(project_id: str, created_by: str = "") -> ingest_pb2.CreateProjectRequest:
    return ingest_pb2.CreateProjectRequest(
        project=projects_pb2.Project(
            project_id=project_id,
            name=project_id,
            labels=[projects_pb2.LabelDef(name="yes"), projects_pb2.LabelDef(name="no")],
            created_by=created_by,
        )
    )


async def _code(call: Awaitable[Any]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


class World:
    def __init__(self, stack: Stack, admin: Clients) -> None:
        self.stack = stack
        self.admin = admin
        self._open: list[Clients] = []

    def clients(self, token: str | None) -> Clients:
        c = Clients(self.stack.targets, token=token)
        self._open.append(c)
        return c

    async def user(self, user_id: str, role: identity_pb2.Role.ValueType, projects: list[str]) -> str:
        await self.admin.identity.CreateUser(
            identity_pb2.CreateUserRequest(
                user_id=user_id, role=role, password=PASSWORD, project_ids=projects
            )
        )
        login = await self.admin.identity.Login(identity_pb2.LoginRequest(user_id=user_id, password=PASSWORD))
        return login.token

    async def close(self) -> None:
        for c in self._open:
            await c.close()


@pytest.fixture
async def world(tmp_path: Path, nats_url: str, database_url: str) -> AsyncIterator[World]:
    stack = Stack(tmp_path / "state", nats_url=nats_url, database_url=database_url, services=SERVICES)
    await asyncio.to_thread(stack.start)
    try:
        async with Clients(stack.targets, token=stack.admin_token) as admin:
            w = World(stack, admin)
            try:
                yield w
            finally:
                await w.close()
    finally:
        await asyncio.to_thread(stack.stop)


def _stats_stubs(clients: Clients) -> dict[str, Any]:
    return dict(clients._stats)


async def test_every_service_refuses_calls_without_a_valid_token(world: World) -> None:
    await world.admin.ingest.CreateProject(_project("p1"))
    for token in (None, "tdm_not-a-real-token"):
        c = world.clients(token)
        calls: dict[str, Awaitable[Any]] = {
            "ingest": c.ingest.GetProject(ingest_pb2.GetProjectRequest(project_id="p1")),
            "review": c.review.NextTask(review_pb2.NextTaskRequest(project_id="p1")),
            "export": c.export.CreateExport(export_pb2.CreateExportRequest(project_id="p1")),
            "identity": c.identity.WhoAmI(identity_pb2.WhoAmIRequest()),
        }
        for name, stub in _stats_stubs(c).items():
            calls[f"{name} stats"] = stub.GetProjectStats(stats_pb2.GetProjectStatsRequest(project_id="p1"))
        codes = {name: await _code(call) for name, call in calls.items()}
        assert set(codes.values()) == {grpc.StatusCode.UNAUTHENTICATED}, codes
    # Health checks stay open: the stack's readiness and `tandem up` rely on them.
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(world.stack.targets["review"]) as ch:
        answer = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
    assert answer.status == health_pb2.HealthCheckResponse.SERVING

    # Every call is measured with its method and status code, the refused ones too.
    url = f"http://127.0.0.1:{world.stack.processes['ingest'].http_port}/metrics"
    metrics = (await asyncio.to_thread(lambda: urllib.request.urlopen(url).read())).decode()
    method = "/tandem.ingest.v1.IngestService"
    assert f'tandem_grpc_requests_total{{code="OK",method="{method}/CreateProject"}} 1.0' in metrics
    assert f'tandem_grpc_requests_total{{code="UNAUTHENTICATED",method="{method}/GetProject"}} 2.0' in metrics
    assert f'tandem_grpc_request_seconds_count{{method="{method}/GetProject"}} 2.0' in metrics


async def test_roles_and_memberships_are_enforced_by_every_service(world: World) -> None:
    mgr_token = await world.user("mgr", identity_pb2.ROLE_MANAGER, [])
    mgr = world.clients(mgr_token)
    # A manager creates a project and is its member from the first call on; created_by is
    # the caller, whatever the request says.
    created = await mgr.ingest.CreateProject(_project("p1", created_by="someone-else"))
    assert created.created_by == "mgr"
    await mgr.ingest.SubmitBatch(
        ingest_pb2.SubmitBatchRequest(
            project_id="p1", items=[ingest_pb2.RawItem(external_id="a", text=b"hello there")]
        )
    )
    await world.admin.ingest.CreateProject(_project("p2"))
    assert [
        p.project_id for p in (await mgr.ingest.ListProjects(ingest_pb2.ListProjectsRequest())).projects
    ] == ["p1"]
    assert await _code(mgr.ingest.GetProject(ingest_pb2.GetProjectRequest(project_id="p2"))) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    # Someone else's project: not even its existence is confirmed by a second create.
    assert await _code(mgr.ingest.CreateProject(_project("p2"))) == grpc.StatusCode.ALREADY_EXISTS
    # Items may name their own project: each one is checked, and refused alone.
    smuggled = ingest_pb2.SubmitBatchRequest(
        project_id="p1",
        items=[
            ingest_pb2.RawItem(external_id="x", text=b"sneaky", project_id="p2"),
            ingest_pb2.RawItem(external_id="y", text=b"a fine text for p1"),
        ],
    )
    answer = await mgr.ingest.SubmitBatch(smuggled)
    assert [r.outcome for r in answer.results] == [
        ingest_pb2.ITEM_OUTCOME_REJECTED,
        ingest_pb2.ITEM_OUTCOME_ACCEPTED,
    ]
    assert "not a member" in answer.results[0].reason

    # The manager edits what may change; what the certificate tests may not.
    edit = ingest_pb2.UpdateProjectRequest(
        project_id="p1",
        changes=projects_pb2.Project(
            instructions="Say yes or no.", hide_suggestions=True, target_accuracy=0.5
        ),
        fields=["instructions", "hide_suggestions"],
    )
    edited = await mgr.ingest.UpdateProject(edit)
    assert (edited.instructions, edited.hide_suggestions, edited.created_by) == (
        "Say yes or no.",
        True,
        "mgr",
    )
    assert edited.target_accuracy == created.target_accuracy
    del edit.fields[:]
    edit.fields.append("target_accuracy")
    assert await _code(mgr.ingest.UpdateProject(edit)) == grpc.StatusCode.INVALID_ARGUMENT
    edit.project_id = "p2"
    assert await _code(mgr.ingest.UpdateProject(edit)) == grpc.StatusCode.PERMISSION_DENIED

    await world.user("ann", identity_pb2.ROLE_ANNOTATOR, [])
    await mgr.identity.AddMember(identity_pb2.AddMemberRequest(project_id="p1", user_id="ann"))
    assert await _code(
        mgr.identity.AddMember(identity_pb2.AddMemberRequest(project_id="p2", user_id="ann"))
    ) == (grpc.StatusCode.PERMISSION_DENIED)
    login = await world.admin.identity.Login(identity_pb2.LoginRequest(user_id="ann", password=PASSWORD))
    ann = world.clients(login.token)
    assert (await ann.identity.WhoAmI(identity_pb2.WhoAmIRequest())).project_ids == ["p1"]
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert await _code(ann.export.CreateExport(export_pb2.CreateExportRequest(project_id="p1"))) == denied
    assert await _code(ann.ingest.CreateProject(_project("p3"))) == denied
    assert await _code(ann.ingest.UpdateProject(ingest_pb2.UpdateProjectRequest(project_id="p1"))) == denied
    assert await _code(ann.review.NextTask(review_pb2.NextTaskRequest(project_id="p2"))) == denied
    assert await _code(ann.ingest.SubmitBatch(ingest_pb2.SubmitBatchRequest(project_id="p1"))) == denied
    assert await _code(ann.identity.CreateUser(identity_pb2.CreateUserRequest(user_id="x"))) == denied
    for stub in _stats_stubs(ann).values():
        request = stats_pb2.GetProjectStatsRequest(project_id="p2")
        assert await _code(stub.GetProjectStats(request)) == denied
        assert await _code(stub.GetProjectStats(stats_pb2.GetProjectStatsRequest(project_id="p1"))) == (
            grpc.StatusCode.OK
        )
    # Their own project's queue is open to them (empty here: nothing was labeled by a model yet).
    assert await _code(ann.review.NextTask(review_pb2.NextTaskRequest(project_id="p1"))) in (
        grpc.StatusCode.OK,
        grpc.StatusCode.NOT_FOUND,
    )

    # An export belongs to its project: another manager cannot read it by id.
    export = await mgr.export.CreateExport(export_pb2.CreateExportRequest(project_id="p1"))
    other = world.clients(await world.user("mgr2", identity_pb2.ROLE_MANAGER, []))
    assert (
        await _code(other.export.GetExport(export_pb2.GetExportRequest(export_id=export.export_id))) == denied
    )
    assert await _code(mgr.export.GetExport(export_pb2.GetExportRequest(export_id=export.export_id))) == (
        grpc.StatusCode.OK
    )
    # Streaming calls carry the token too (each kind of call has its own client interceptor).
    chunks = [
        c async for c in mgr.export.StreamExport(export_pb2.StreamExportRequest(export_id=export.export_id))
    ]
    assert isinstance(chunks, list)

    async def batches() -> AsyncIterator[ingest_pb2.SubmitBatchRequest]:
        yield ingest_pb2.SubmitBatchRequest(
            project_id="p1", items=[ingest_pb2.RawItem(external_id="s", text=b"streamed text")]
        )

    assert (await mgr.ingest.BulkSubmit(batches())).accepted == 1
    assert await _code(ann.ingest.BulkSubmit(batches())) == denied

    # A removed membership holds at once.
    await mgr.identity.RemoveMember(identity_pb2.RemoveMemberRequest(project_id="p1", user_id="ann"))
    assert await _code(ann.review.NextTask(review_pb2.NextTaskRequest(project_id="p1"))) == denied


async def test_revoked_tokens_and_disabled_users_stop_at_once(world: World) -> None:
    session = await world.user("ann", identity_pb2.ROLE_ANNOTATOR, [])
    ann = world.clients(session)
    made = await ann.identity.CreateToken(identity_pb2.CreateTokenRequest(name="ci", ttl_seconds=3600))
    api = world.clients(made.token)
    assert (await api.identity.WhoAmI(identity_pb2.WhoAmIRequest())).user_id == "ann"
    listed = await ann.identity.ListTokens(identity_pb2.ListTokensRequest())
    assert made.info.token_id in {t.token_id for t in listed.tokens}
    # Nobody but an admin manages another user's tokens.
    other = world.clients(await world.user("ann2", identity_pb2.ROLE_ANNOTATOR, []))
    assert await _code(
        other.identity.RevokeToken(identity_pb2.RevokeTokenRequest(token_id=made.info.token_id))
    ) == (grpc.StatusCode.PERMISSION_DENIED)

    await ann.identity.RevokeToken(identity_pb2.RevokeTokenRequest(token_id=made.info.token_id))
    assert await _code(api.identity.WhoAmI(identity_pb2.WhoAmIRequest())) == grpc.StatusCode.UNAUTHENTICATED
    assert await _code(api.review.NextTask(review_pb2.NextTaskRequest(project_id="p1"))) == (
        grpc.StatusCode.UNAUTHENTICATED
    )

    await ann.identity.Logout(identity_pb2.LogoutRequest())
    assert await _code(ann.identity.WhoAmI(identity_pb2.WhoAmIRequest())) == grpc.StatusCode.UNAUTHENTICATED

    second = world.clients(
        (await world.admin.identity.Login(identity_pb2.LoginRequest(user_id="ann2", password=PASSWORD))).token
    )
    await world.admin.identity.UpdateUser(
        identity_pb2.UpdateUserRequest(user_id="ann2", set_disabled=True, disabled=True)
    )
    assert (
        await _code(second.identity.WhoAmI(identity_pb2.WhoAmIRequest())) == grpc.StatusCode.UNAUTHENTICATED
    )
    assert (
        await _code(world.admin.identity.Login(identity_pb2.LoginRequest(user_id="ann2", password=PASSWORD)))
        == grpc.StatusCode.UNAUTHENTICATED
    )


async def test_login_is_rate_limited(world: World) -> None:
    await world.user("ann", identity_pb2.ROLE_ANNOTATOR, [])
    anonymous = world.clients(None)
    codes = [
        await _code(anonymous.identity.Login(identity_pb2.LoginRequest(user_id="ann", password=f"wrong-{i}")))
        for i in range(5)
    ]
    assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
    # The sixth try is refused before the password is looked at, even the right one.
    right = anonymous.identity.Login(identity_pb2.LoginRequest(user_id="ann", password=PASSWORD))
    assert await _code(right) == grpc.StatusCode.RESOURCE_EXHAUSTED
