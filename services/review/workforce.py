"""gRPC edge of the workforce: pools, people, pauses, gold questions and the quality figures."""

from __future__ import annotations

import math
import re

import asyncpg
import grpc

from services.common.gold import GOLD_PER_CALL as MAX_GOLD
from services.common.gold import MAX_GOLD_TEXT
from services.common.grpc_context import Context
from services.common.projects import ProjectDirectory
from services.gen.tandem.workforce.v1 import workforce_pb2, workforce_pb2_grpc
from services.review import aggregation, workforce_repo
from services.review.aggregation import Judgment
from services.review.consensus import ConsensusKeeper
from services.review.service import wilson
from services.review.workforce_repo import Gold, Member, Pool

POOL_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
SKILL_RE = re.compile(r"^[^=\s]{1,64}=[^\s].{0,127}$")


def _rate(successes: int, n: int) -> workforce_pb2.Rate:
    if n <= 0:
        return workforce_pb2.Rate()
    low, high = wilson(successes, n)
    return workforce_pb2.Rate(value=successes / n, low=low, high=high, n=n)


class WorkforceServicer(workforce_pb2_grpc.WorkforceServiceServicer):
    def __init__(self, pool: asyncpg.Pool, projects: ProjectDirectory, consensus: ConsensusKeeper) -> None:
        self._pool = pool
        self._projects = projects
        self._consensus = consensus

    async def PutPool(self, request: workforce_pb2.Pool, context: Context) -> workforce_pb2.Pool:
        if not POOL_ID_RE.match(request.pool_id):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "pool_id must be 1-63 characters of a-z, 0-9, '-' or '_'"
            )
        if request.max_leased < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_leased must not be negative")
        async with self._pool.acquire() as conn:
            try:
                pool = await workforce_repo.put_pool(
                    conn, Pool(request.pool_id, request.name, request.max_leased, request.vendor_user_id)
                )
            except asyncpg.UniqueViolationError:
                await context.abort(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"{request.vendor_user_id} is already the vendor account of another pool",
                )
        return _pool_message(pool)

    async def ListPools(
        self, request: workforce_pb2.ListPoolsRequest, context: Context
    ) -> workforce_pb2.ListPoolsResponse:
        async with self._pool.acquire() as conn:
            pools = await workforce_repo.pools(conn)
        return workforce_pb2.ListPoolsResponse(pools=[_pool_message(p) for p in pools])

    async def PutAnnotator(
        self, request: workforce_pb2.Annotator, context: Context
    ) -> workforce_pb2.Annotator:
        if not request.annotator_id or len(request.annotator_id) > 200:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "annotator_id is required (a user id)")
        bad = [s for s in request.skills if not SKILL_RE.match(s)]
        if bad:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"skills are 'field=value': {bad[:3]}")
        if request.max_leased < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_leased must not be negative")
        async with self._pool.acquire() as conn:
            if request.pool_id and not await workforce_repo.pool_exists(conn, request.pool_id):
                await context.abort(
                    grpc.StatusCode.NOT_FOUND, f"no pool {request.pool_id!r}: create it with PutPool first"
                )
            member = await workforce_repo.put_member(
                conn,
                Member(request.annotator_id, request.pool_id, tuple(request.skills), request.max_leased),
            )
        return _annotator_message(member)

    async def ListAnnotators(
        self, request: workforce_pb2.ListAnnotatorsRequest, context: Context
    ) -> workforce_pb2.ListAnnotatorsResponse:
        async with self._pool.acquire() as conn:
            found = await workforce_repo.members(conn, pool_id=request.pool_id)
        return workforce_pb2.ListAnnotatorsResponse(annotators=[_annotator_message(m) for m in found])

    async def SetPaused(
        self, request: workforce_pb2.SetPausedRequest, context: Context
    ) -> workforce_pb2.Annotator:
        if not request.annotator_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "annotator_id is required")
        async with self._pool.acquire() as conn:
            await workforce_repo.set_paused(
                conn,
                request.project_id,
                request.annotator_id,
                request.paused,
                request.reason or ("paused by a manager" if request.paused else ""),
            )
            found = await workforce_repo.members(conn, annotator_id=request.annotator_id)
        if found:
            return _annotator_message(found[0])
        return workforce_pb2.Annotator(
            annotator_id=request.annotator_id, paused_projects=[request.project_id] if request.paused else []
        )

    async def AddGold(
        self, request: workforce_pb2.AddGoldRequest, context: Context
    ) -> workforce_pb2.AddGoldResponse:
        project = await self._projects.get(request.project_id)
        if not request.items or len(request.items) > MAX_GOLD:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"send 1 to {MAX_GOLD} gold items per call")
        problems = []
        for i, g in enumerate(request.items):
            if not g.external_id or not g.text.strip():
                problems.append(f"#{i}: external_id and text are required")
            elif len(g.text) > MAX_GOLD_TEXT:
                problems.append(f"{g.external_id}: text longer than {MAX_GOLD_TEXT} characters")
            elif g.answer not in project.label_names:
                problems.append(f"{g.external_id}: answer {g.answer!r} is not one of the project's labels")
        if problems:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(problems[:5]))
        # One row per external id, the last one given (one INSERT cannot update a row twice).
        items = {g.external_id: Gold(g.external_id, g.text, g.answer) for g in request.items}
        async with self._pool.acquire() as conn:
            added, total = await workforce_repo.add_gold(conn, request.project_id, list(items.values()))
        return workforce_pb2.AddGoldResponse(added=added, total=total)

    async def GetQuality(
        self, request: workforce_pb2.GetQualityRequest, context: Context
    ) -> workforce_pb2.Quality:
        project = await self._projects.get(request.project_id)
        async with self._pool.acquire() as conn:
            people = await workforce_repo.people(conn, request.project_id, project.pool_ids)
            rows = await workforce_repo.judgments(conn, request.project_id)
            settled = await workforce_repo.consensus(conn, request.project_id)
            queues = await workforce_repo.pool_queues(conn, request.project_id)
            gold_items = await workforce_repo.gold_count(conn, request.project_id)
        judgments = [Judgment(i, a, lb) for i, a, lb in rows]
        agree: dict[str, list[int]] = {}
        for j in judgments:
            if j.item_id in settled:
                counts = agree.setdefault(j.annotator_id, [0, 0])
                counts[0] += int(j.label == settled[j.item_id][0])
                counts[1] += 1
        out = workforce_pb2.Quality(
            project_id=request.project_id,
            consensus_items=len(settled),
            method=self._consensus.method(request.project_id),
            gold_items=gold_items,
            krippendorff_alpha=aggregation.krippendorff_alpha(judgments, project.label_names)
            if judgments
            else math.nan,
        )
        by_pool: dict[str, list[int]] = {}
        for p in people:
            ok, n = agree.get(p.annotator_id, [0, 0])
            out.annotators.append(
                workforce_pb2.AnnotatorQuality(
                    annotator_id=p.annotator_id,
                    pool_id=p.pool_id,
                    labels=p.labels,
                    gold_accuracy=_rate(p.gold_correct, p.gold_answered),
                    consensus_agreement=_rate(ok, n),
                    paused=p.paused,
                    paused_reason=p.paused_reason,
                    leased=p.leased,
                )
            )
            totals = by_pool.setdefault(p.pool_id, [0, 0, 0, 0, 0])
            for i, v in enumerate((1, p.labels, p.gold_correct, p.gold_answered, ok)):
                totals[i] += v
            totals.append(n)
        queue_of = {q.pool_id: q for q in queues}
        for pool_id in sorted(set(by_pool) | set(queue_of)):
            t = by_pool.get(pool_id, [0, 0, 0, 0, 0])
            q = queue_of.get(pool_id)
            out.pools.append(
                workforce_pb2.PoolQuality(
                    pool_id=pool_id,
                    annotators=t[0],
                    labels=t[1],
                    gold_accuracy=_rate(t[2], t[3]),
                    consensus_agreement=_rate(t[4], sum(t[5:])),
                    open=q.open if q else 0,
                    leased=q.leased if q else 0,
                    oldest_open_seconds=q.oldest_open_seconds if q else 0.0,
                )
            )
        for pk in aggregation.pairwise_kappa(judgments, min_items=10):
            out.kappas.append(workforce_pb2.PairKappa(a=pk.a, b=pk.b, kappa=pk.kappa, items=pk.items))
        return out


def _pool_message(p: Pool) -> workforce_pb2.Pool:
    return workforce_pb2.Pool(
        pool_id=p.pool_id, name=p.name, max_leased=p.max_leased, vendor_user_id=p.vendor_user_id
    )


def _annotator_message(m: Member) -> workforce_pb2.Annotator:
    return workforce_pb2.Annotator(
        annotator_id=m.annotator_id,
        pool_id=m.pool_id,
        skills=list(m.skills),
        max_leased=m.max_leased,
        paused_projects=list(m.paused_projects),
    )
