"""gRPC edge of the ingest service: protobuf in, domain calls, SQL, outbox, protobuf out."""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence

import asyncpg
import grpc
from prometheus_client import Counter

from services.common.auth import IdentityView, caller, may_access
from services.common.bus.outbox import OutboxRelay, Outgoing
from services.common.grpc_context import Context
from services.common.projects import ProjectDirectory, ProjectSpec
from services.gen.tandem.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from services.gen.tandem.items.v1 import items_pb2
from services.gen.tandem.projects.v1 import projects_pb2
from services.gen.tandem.stats.v1 import stats_pb2, stats_pb2_grpc
from services.ingest import repo
from services.ingest.service import (
    InvalidProject,
    ItemAnswer,
    Limits,
    Outcome,
    RawItem,
    ValidItem,
    chunk,
    edit_project,
    screen,
    validate_project,
)
from services.ingest.settings import IngestSettings

log = logging.getLogger(__name__)

ITEMS = Counter("tandem_ingest_items_total", "Items submitted, by outcome.", ["outcome"])

_OUTCOMES = {
    Outcome.ACCEPTED: ingest_pb2.ITEM_OUTCOME_ACCEPTED,
    Outcome.DUPLICATE: ingest_pb2.ITEM_OUTCOME_DUPLICATE,
    Outcome.REJECTED: ingest_pb2.ITEM_OUTCOME_REJECTED,
}


class Ingestor:
    """Takes a request's items through validation, storage and publication."""

    def __init__(
        self, pool: asyncpg.Pool, relay: OutboxRelay, projects: ProjectDirectory, settings: IngestSettings
    ) -> None:
        self._pool = pool
        self._relay = relay
        self._projects = projects
        self._settings = settings
        self._limits = Limits(
            max_text_bytes=settings.max_text_bytes,
            max_metadata_keys=settings.max_metadata_keys,
            max_metadata_value_chars=settings.max_metadata_value_chars,
        )

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    async def create_project(self, proto: projects_pb2.Project, created_by: str) -> projects_pb2.Project:
        spec = dataclasses.replace(validate_project(ProjectSpec.from_proto(proto)), created_by=created_by)
        stored = spec.to_proto()
        stored.created_unix_ms = int(time.time() * 1000)
        async with self._pool.acquire() as conn, conn.transaction():
            created = await repo.insert_project(conn, stored)
            if not created:
                existing = await repo.get_project(conn, spec.project_id)
                assert existing is not None
                return existing
        # After commit; on failure the client retries CreateProject, which re-puts the entry.
        await self._projects.put(spec)
        return stored

    async def update_project(
        self, project_id: str, changes: projects_pb2.Project, fields: Sequence[str]
    ) -> projects_pb2.Project | None:
        async with self._pool.acquire() as conn, conn.transaction():
            current = await repo.lock_project(conn, project_id)
            if current is None:
                return None
            edited = edit_project(ProjectSpec.from_proto(current), ProjectSpec.from_proto(changes), fields)
            stored = edited.to_proto()
            stored.created_unix_ms = current.created_unix_ms
            await repo.update_project(conn, stored)
        # After commit: the other services read projects from the bucket (within its cache time).
        await self._projects.put(edited)
        return stored

    async def get_project(self, project_id: str) -> projects_pb2.Project | None:
        async with self._pool.acquire() as conn:
            project = await repo.get_project(conn, project_id)
        if project is not None:
            # Heals a bucket entry lost between commit and put (or a recreated bucket).
            await self._projects.put(ProjectSpec.from_proto(project))
        return project

    async def submit(self, default_project: str, raw: Sequence[RawItem]) -> list[ItemAnswer]:
        answers = [ItemAnswer(external_id=r.external_id, outcome=Outcome.REJECTED) for r in raw]
        async with self._pool.acquire() as conn:
            known = await repo.existing_projects(conn, [r.project_id for r in raw])
            screened = screen(raw, known, self._limits)
            now = repo.utcnow()
            async with conn.transaction():
                inserted = await repo.insert_items(conn, screened.valid, now)
                fresh = [it for it in screened.valid if it.index in inserted]
                dupes = [it for it in screened.valid if it.index not in inserted]
                existing: dict[tuple[str, str], str] = {}
                for project_id in {it.project_id for it in dupes}:
                    hashes = [it.content_hash for it in dupes if it.project_id == project_id]
                    for h, item_id in (await repo.existing_ids(conn, project_id, hashes)).items():
                        existing[(project_id, h)] = item_id
                await repo.record_rejections(conn, screened.rejected)
                touched = {it.project_id for it in dupes} | {r.project_id for r in screened.rejected}
                for project_id in touched & known:
                    await repo.bump_counters(
                        conn,
                        project_id,
                        sum(1 for it in dupes if it.project_id == project_id),
                        sum(1 for r in screened.rejected if r.project_id == project_id),
                    )
                await repo.publish(conn, self._batches(fresh, inserted, now.timestamp()))
        self._relay.notify()
        for it in fresh:
            answers[it.index] = ItemAnswer(it.external_id, Outcome.ACCEPTED, item_id=inserted[it.index])
        for it in dupes:
            answers[it.index] = ItemAnswer(
                it.external_id,
                Outcome.DUPLICATE,
                item_id=existing.get((it.project_id, it.content_hash), ""),
                reason="an item with the same text already exists in this project",
            )
        for rej in screened.rejected:
            answers[rej.index] = ItemAnswer(rej.external_id, Outcome.REJECTED, reason=rej.reason)
        for answer in answers:
            ITEMS.labels(answer.outcome.value).inc()
        return answers

    def _batches(self, fresh: list[ValidItem], ids: dict[int, str], now_s: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        for project_id in sorted({it.project_id for it in fresh}):
            items = [it for it in fresh if it.project_id == project_id]
            for part in chunk(items, self._settings.publish_batch_items, self._settings.publish_batch_bytes):
                batch_id = str(uuid.uuid4())
                message = items_pb2.ItemBatch(
                    batch_id=batch_id,
                    project_id=project_id,
                    items=[
                        items_pb2.Item(
                            item_id=ids[it.index],
                            project_id=project_id,
                            external_id=it.external_id or ids[it.index],
                            text=it.text,
                            metadata=it.metadata,
                            content_hash=it.content_hash,
                            synthetic=it.synthetic,
                            ingested_unix_ms=int(now_s * 1000),
                        )
                        for it in part
                    ],
                )
                out.append(Outgoing(msg_id=f"items:{batch_id}", message=message))
        return out

    async def stats(self, project_id: str) -> stats_pb2.IngestStats:
        async with self._pool.acquire() as conn:
            items, duplicates, rejected, first = await repo.stats(conn, project_id)
        return stats_pb2.IngestStats(
            items=items,
            duplicates=duplicates,
            rejected=rejected,
            first_ingested_unix_ms=int(first.timestamp() * 1000) if first else 0,
        )


def _raw_items(request: ingest_pb2.SubmitBatchRequest) -> list[RawItem]:
    return [
        RawItem(
            external_id=it.external_id,
            text=it.text,
            metadata=dict(it.metadata),
            synthetic=it.synthetic,
            project_id=it.project_id or request.project_id,
        )
        for it in request.items
    ]


def _result(answer: ItemAnswer) -> ingest_pb2.ItemResult:
    return ingest_pb2.ItemResult(
        external_id=answer.external_id,
        outcome=_OUTCOMES[answer.outcome],
        item_id=answer.item_id,
        reason=answer.reason,
    )


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, ingestor: Ingestor, settings: IngestSettings, view: IdentityView) -> None:
        self._ingestor = ingestor
        self._settings = settings
        self._view = view

    async def CreateProject(
        self, request: ingest_pb2.CreateProjectRequest, context: Context
    ) -> projects_pb2.Project:
        try:
            project = await self._ingestor.create_project(request.project, caller().user_id)
        except InvalidProject as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # unreachable: abort raises
        # An existing project is returned (a retried create) only to someone who may see it.
        if project.created_by != caller().user_id and not caller().member_of(project.project_id):
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"project {project.project_id!r} exists already"
            )
        return project

    async def UpdateProject(
        self, request: ingest_pb2.UpdateProjectRequest, context: Context
    ) -> projects_pb2.Project:
        try:
            project = await self._ingestor.update_project(request.project_id, request.changes, request.fields)
        except InvalidProject as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # unreachable: abort raises
        if project is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown project {request.project_id!r}")
        assert project is not None
        return project

    async def GetProject(
        self, request: ingest_pb2.GetProjectRequest, context: Context
    ) -> projects_pb2.Project:
        project = await self._ingestor.get_project(request.project_id)
        if project is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown project {request.project_id!r}")
        assert project is not None
        return project

    async def ListProjects(
        self, request: ingest_pb2.ListProjectsRequest, context: Context
    ) -> ingest_pb2.ListProjectsResponse:
        async with self._ingestor.pool.acquire() as conn:
            projects = await repo.list_projects(conn)
        me = caller()
        mine = [p for p in projects if me.member_of(p.project_id) or p.created_by == me.user_id]
        return ingest_pb2.ListProjectsResponse(projects=mine)

    async def _submit(self, default_project: str, raw: Sequence[RawItem]) -> list[ItemAnswer]:
        """Items may name their own project: those naming one the caller may not use are
        rejected one by one (the rest of the batch goes in, as for any other bad item)."""
        me = caller()
        named = {it.project_id for it in raw}
        denied = {p for p in named if not await may_access(self._view, me, p)}
        allowed = [it for it in raw if it.project_id not in denied]
        answers = iter(await self._ingestor.submit(default_project, allowed) if allowed else [])
        return [
            ItemAnswer(
                it.external_id,
                Outcome.REJECTED,
                reason=f"unknown project {it.project_id!r}, or {me.user_id} is not a member of it",
            )
            if it.project_id in denied
            else next(answers)
            for it in raw
        ]

    async def SubmitBatch(
        self, request: ingest_pb2.SubmitBatchRequest, context: Context
    ) -> ingest_pb2.SubmitBatchResponse:
        if len(request.items) > self._settings.max_items_per_request:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(request.items)} items in one request; the limit is {self._settings.max_items_per_request}",
            )
        answers = await self._submit(request.project_id, _raw_items(request))
        return ingest_pb2.SubmitBatchResponse(
            results=[_result(a) for a in answers],
            accepted=sum(a.outcome is Outcome.ACCEPTED for a in answers),
            duplicates=sum(a.outcome is Outcome.DUPLICATE for a in answers),
            rejected=sum(a.outcome is Outcome.REJECTED for a in answers),
        )

    async def BulkSubmit(
        self,
        request_iterator: AsyncIterator[ingest_pb2.SubmitBatchRequest],
        context: Context,
    ) -> ingest_pb2.BulkSubmitResponse:
        response = ingest_pb2.BulkSubmitResponse()
        async for request in request_iterator:
            if len(request.items) > self._settings.max_items_per_request:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "a stream message exceeds the item limit"
                )
            for answer in await self._submit(request.project_id, _raw_items(request)):
                if answer.outcome is Outcome.ACCEPTED:
                    response.accepted += 1
                elif answer.outcome is Outcome.DUPLICATE:
                    response.duplicates += 1
                else:
                    response.rejected += 1
                    if len(response.rejections) < 1000:
                        response.rejections.append(_result(answer))
        return response


class IngestStatsServicer(stats_pb2_grpc.StatsServiceServicer):
    def __init__(self, ingestor: Ingestor) -> None:
        self._ingestor = ingestor

    async def GetProjectStats(
        self, request: stats_pb2.GetProjectStatsRequest, context: Context
    ) -> stats_pb2.ProjectStats:
        return stats_pb2.ProjectStats(
            project_id=request.project_id, ingest=await self._ingestor.stats(request.project_id)
        )
