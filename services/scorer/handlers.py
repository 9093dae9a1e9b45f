"""Bus and gRPC edge of the scorer: predictions and human labels in; tasks, withdrawals and
automatic final labels out (through the outbox)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from typing import TypeVar

import asyncpg
import numpy as np
from prometheus_client import Counter, Gauge

from services.common.bus.outbox import OutboxRelay, Outgoing
from services.common.bus.worker import Delivery
from services.common.errors import PermanentError
from services.common.fewshot import FewShotSet, FewShotStore, select_demonstrations
from services.common.grpc_context import Context
from services.common.projects import ProjectDirectory, ProjectSpec
from services.gen.tandem.labels.v1 import labels_pb2
from services.gen.tandem.predictions.v1 import predictions_pb2
from services.gen.tandem.stats.v1 import stats_pb2, stats_pb2_grpc
from services.gen.tandem.tasks.v1 import tasks_pb2
from services.scorer import repo
from services.scorer.policy.centroids import DecisionKind, wilson_lower_bound
from services.scorer.policy.model import LRPolicyConfig, features
from services.scorer.service import AUDIT_WINDOW, ProjectModel, held_reason
from services.scorer.settings import ScorerSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

DECISIONS = Counter("tandem_scorer_decisions_total", "Scorer decisions, by outcome.", ["outcome"])
REFITS = Counter("tandem_scorer_refits_total", "Model refits.")
WITHDRAWN = Counter("tandem_scorer_withdrawn_total", "Review tasks withdrawn after a refit.")
SECOND_OPINIONS = Counter(
    "tandem_scorer_second_opinions_total", "Human labels sent for a second opinion (confident learning)."
)
SECOND_OPINION = "second_opinion"
RERANK_EPSILON = 0.01
THRESHOLD = Gauge("tandem_scorer_auto_threshold", "Auto-accept confidence threshold of the last refit model.")
ESTIMATED = Gauge(
    "tandem_scorer_estimated_accuracy", "Leave-one-out accuracy above the threshold of the last refit model."
)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class Scorer:
    def __init__(
        self,
        pool: asyncpg.Pool,
        relay: OutboxRelay,
        projects: ProjectDirectory,
        settings: ScorerSettings,
        fewshot: FewShotStore | None = None,
    ) -> None:
        self._pool = pool
        self._fewshot = fewshot
        self._demo_ids: dict[str, tuple[str, ...]] = {}
        self._relay = relay
        self._projects = projects
        self._settings = settings
        self._policy: LRPolicyConfig = settings.policy()
        self._models: dict[str, ProjectModel] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._dirty: dict[str, float] = {}  # project → monotonic time of the first unrefit label
        self._wake = asyncio.Event()

    def _lock(self, project_id: str) -> asyncio.Lock:
        return self._locks.setdefault(project_id, asyncio.Lock())

    async def _model(
        self, project: ProjectSpec, label_embeddings: np.ndarray | None = None, model_id: str = ""
    ) -> ProjectModel:
        """The project's model, rebuilt from PostgreSQL after a restart."""
        model = self._models.get(project.project_id)
        if model is not None:
            return model
        async with self._pool.acquire() as conn:
            stored = await repo.load_label_space(conn, project.project_id)
            if stored is None:
                if label_embeddings is None:
                    raise PermanentError(f"no label embeddings known for project {project.project_id!r}")
                await repo.save_label_space(conn, project.project_id, model_id, label_embeddings)
                stored = label_embeddings
            labeled = await repo.load_human_labels(conn, project.project_id)
            audits = await repo.recent_audits(conn, project.project_id, AUDIT_WINDOW)
            seen = await repo.count_items(conn, project.project_id)
        model = ProjectModel(project, stored, self._policy)
        model.add_audit_results(audits)
        model.seen = seen
        model.second_opinion_asked = labeled.second_opinion_asked
        if len(labeled.y):
            model.add_labels(
                features(labeled.embeddings, labeled.zero_shot), labeled.y, labeled.item_ids, labeled.reasons
            )
        model.refit()
        self._models[project.project_id] = model
        if model.budget_spent():
            # A restart between stopping people and finalizing must not leave items waiting.
            self._refit_now(project.project_id)
        log.info(
            "model for %s ready: %d human labels, threshold %s",
            project.project_id,
            model.n_labels,
            model.threshold,
        )
        return model

    # -- predictions ---------------------------------------------------------------------------

    async def on_predictions(self, delivery: Delivery) -> None:
        batch = delivery.message
        assert isinstance(batch, predictions_pb2.PredictionBatch)
        if not batch.predictions:
            return
        project = await self._projects.get(batch.project_id)
        k = len(project.labels)
        label_emb = None
        if batch.label_embeddings:
            label_emb = np.asarray(batch.label_embeddings, dtype=np.float32).reshape(k, -1)
        for p in batch.predictions:
            if len(p.probs) != k or not p.embedding:
                raise PermanentError(f"prediction for {p.item_id} does not match the project's {k} labels")
        async with self._lock(project.project_id):
            model = await self._model(project, label_emb, batch.model_id)
            await self._decide_new(project, model, batch, delivery.msg_id)

    async def _decide_new(
        self, project: ProjectSpec, model: ProjectModel, batch: predictions_pb2.PredictionBatch, msg_id: str
    ) -> None:
        X = np.vstack([np.asarray(p.embedding, dtype=np.float32) for p in batch.predictions])
        zero_shot = np.vstack([np.asarray(p.probs, dtype=np.float32) for p in batch.predictions])
        ids = [p.item_id for p in batch.predictions]
        decisions = model.decide(features(X, zero_shot), ids)
        spent = model.budget_spent(extra_seen=len(ids))
        rows: list[repo.ItemDecision] = []
        for p, d in zip(batch.predictions, decisions, strict=True):
            priority = d.priority
            if p.synthetic:
                # Written by a model: never accepted without a person, budget or not.
                state, reason, priority = "review", "synthetic", 1.0
            elif spent and d.kind is not DecisionKind.AUTO:
                state, reason = "model", "budget"
            elif model.is_control(p.item_id):
                # The random arm: people label it whatever the model thinks, served first.
                state, reason, priority = "review", "control", 1.0
            elif d.kind is DecisionKind.AUTO:
                state, reason = "auto", "confident"
            elif d.kind is DecisionKind.AUDIT:
                # Before a threshold exists the draw samples all items, not auto-acceptable ones:
                # their agreement says nothing about auto-accepted accuracy (see add_audit_results).
                state, reason = "review", held_reason(model.threshold)
            else:
                state, reason = "review", "uncertain" if model.ranks_by_ambiguity else "warmup"
            rows.append(repo.ItemDecision(p.item_id, state, reason, d.label, d.confidence, priority))
        new_items = [
            repo.NewItem(
                item_id=p.item_id,
                external_id=p.external_id,
                text=p.text,
                synthetic=p.synthetic,
                embedding=X[i],
                zero_shot=list(p.probs),
                model_id=batch.model_id,
            )
            for i, p in enumerate(batch.predictions)
        ]
        async with self._pool.acquire() as conn, conn.transaction():
            fresh = await repo.insert_new(conn, project.project_id, new_items, rows)
            todo = [(p, r) for p, r in zip(batch.predictions, rows, strict=True) if p.item_id in fresh]
            tasks = [
                self._task(project, p.item_id, p.external_id, p.text, r, p.synthetic)
                for p, r in todo
                if r.state == "review"
            ]
            finals = [
                self._final(
                    project, p.item_id, r.label, r.confidence, model.version, below_target=r.state == "model"
                )
                for p, r in todo
                if r.state in ("auto", "model")
            ]
            await repo.publish(conn, self._outgoing(project.project_id, f"new:{msg_id}", tasks, finals, []))
        model.seen += len(todo)
        self._relay.notify()
        for _, r in todo:
            DECISIONS.labels(r.reason).inc()

    # -- human labels --------------------------------------------------------------------------

    async def on_human_labels(self, delivery: Delivery) -> None:
        batch = delivery.message
        assert isinstance(batch, labels_pb2.HumanLabelBatch)
        if not batch.labels:
            return
        project = await self._projects.get(batch.project_id)
        names = project.label_names
        unknown = [lb.label for lb in batch.labels if lb.label not in names]
        if unknown:
            raise PermanentError(f"labels {sorted(set(unknown))} are not in project {project.project_id!r}")
        firsts = [lb for lb in batch.labels if lb.reason != SECOND_OPINION]
        seconds = [lb for lb in batch.labels if lb.reason == SECOND_OPINION]
        async with self._lock(project.project_id):
            model = await self._model(project)
            async with self._pool.acquire() as conn, conn.transaction():
                new = await repo.record_human_labels(
                    conn, [(lb.item_id, names.index(lb.label), lb.annotator_id) for lb in firsts]
                )
                opinions = await repo.record_second_opinions(
                    conn, [(lb.item_id, names.index(lb.label), lb.annotator_id) for lb in seconds]
                )
                by_item = {lb.item_id: lb for lb in seconds}
                corrected = [
                    o
                    for o in opinions
                    if o.second_label != o.first_label and o.second_label == o.suspected_label
                ]
                finals = [
                    labels_pb2.FinalLabel(
                        item_id=o.item_id,
                        label=names[o.second_label],
                        source=labels_pb2.LABEL_SOURCE_CONSENSUS,
                        confidence=1.0,
                        model_version=model.version,
                        annotator_ids=[o.first_annotator, by_item[o.item_id].annotator_id],
                        finalized_unix_ms=_now_ms(),
                    )
                    for o in corrected
                ]
                await repo.publish(
                    conn, self._outgoing(project.project_id, f"consensus:{delivery.msg_id}", [], finals, [])
                )
            self._relay.notify()
            for o in corrected:
                # Two of three votes (the second person and the model) against the first label.
                model.relabel(o.item_id, o.second_label)
            if new:
                # Labels of tasks people held when the budget ran out keep arriving: their tasks
                # were withdrawn already.
                was_spent = model.budget_spent()
                model.add_labels(
                    features(np.vstack([n.embedding for n in new]), np.vstack([n.zero_shot for n in new])),
                    np.array([n.label for n in new]),
                    [n.item_id for n in new],
                    [n.reason for n in new],
                )
                model.add_audit_results(n.label == n.predicted_label for n in new if n.reason == "audit")
                if model.budget_spent():
                    if not was_spent:
                        await self._withdraw_open_tasks(model)
                    # Stop people at once, but finalize with a model that has seen every label:
                    # the last seconds of labels are missing from the current one, and it would
                    # label every waiting item for good. The refit loop runs that refit now.
                    self._refit_now(project.project_id)
                else:
                    self._dirty.setdefault(project.project_id, time.monotonic())
                    self._wake.set()

    # -- refit and re-score --------------------------------------------------------------------

    async def refit_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            now = time.monotonic()
            for project_id, since in list(self._dirty.items()):
                model = self._models.get(project_id)
                if model is None:
                    self._dirty.pop(project_id, None)
                    continue
                due = model.pending_labels >= self._settings.refit_every
                if due or now - since >= self._settings.refit_seconds:
                    self._dirty.pop(project_id, None)
                    try:
                        await self.refit(project_id)
                    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                        # The database is away: keep the project dirty and try again shortly.
                        log.warning("refit of %s failed; will retry", project_id, exc_info=True)
                        self._dirty.setdefault(project_id, time.monotonic())
                    except Exception:
                        # A bug in one project's refit must not stop the others': the next label
                        # marks the project dirty again.
                        log.exception("refit of %s failed", project_id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=0.25)

    async def refit(self, project_id: str) -> None:
        model = self._models[project_id]
        # The fits take seconds on large label spaces: in a worker thread and outside the project
        # lock, so human labels and predictions keep flowing in meanwhile (ProjectModel.refit fits
        # on the labels present when it starts). Only this loop refits, one project at a time.
        await asyncio.to_thread(model.refit)
        async with self._lock(project_id):
            REFITS.inc()
            THRESHOLD.set(model.threshold or 0.0)
            ESTIMATED.set(model.estimated_accuracy)
            spent = model.budget_spent()
            if spent and model.pending_labels:
                # Labels of tasks leased before the budget ran out came in during the fit.
                self._refit_now(project_id)
                return
            waiting, X_waiting = await self._waiting(model, spent=spent)
            project = model.project
            if spent:
                await self._finalize_below_target(model, waiting, X_waiting)
                return
            result = model.rescore(X_waiting, [w.item_id for w in waiting])
            # Only changes that can reorder the queue travel to review; a large pool would
            # otherwise resend every waiting task after every refit.
            result.reprioritize = [
                (row, prio)
                for row, prio in result.reprioritize
                if abs(prio - waiting[row].priority) > RERANK_EPSILON
            ]
            held = [
                (waiting[row].item_id, reason, label, conf, prio)
                for row, label, conf, prio, reason in result.audit
            ]
            async with self._pool.acquire() as conn, conn.transaction():
                await repo.save_model_state(
                    conn, project_id, model.refits, model.threshold, model.estimated_accuracy
                )
                accepted_ids = await repo.accept_waiting(
                    conn,
                    [(waiting[row].item_id, label, conf) for row, label, conf in result.accept],
                    model.version,
                )
                finals = [
                    self._final(project, waiting[row].item_id, label, conf, model.version)
                    for row, label, conf in result.accept
                    if waiting[row].item_id in accepted_ids
                ]
                await repo.update_priorities(
                    conn, [(waiting[row].item_id, prio) for row, prio in result.reprioritize]
                )
                await repo.hold_for_people(conn, held)
                # Re-ranking carries no text: the task exists in review already (see ReviewTask).
                tasks = [
                    tasks_pb2.ReviewTask(
                        item_id=waiting[row].item_id, project_id=project_id, priority=prio, reason="uncertain"
                    )
                    for row, prio in result.reprioritize
                ] + [
                    tasks_pb2.ReviewTask(item_id=item_id, project_id=project_id, priority=prio, reason=reason)
                    for item_id, reason, _, _, prio in held
                ]
                await repo.publish(
                    conn,
                    self._outgoing(
                        project_id, f"refit:{project_id}:{model.refits}", tasks, finals, sorted(accepted_ids)
                    ),
                )
            self._relay.notify()
            await self._request_second_opinions(model)
            await self._publish_demonstrations(model)
            WITHDRAWN.inc(len(accepted_ids))
            DECISIONS.labels("rescored").inc(len(accepted_ids))
            for _, reason, _, _, _ in held:
                DECISIONS.labels(reason).inc()
            if accepted_ids or model.refits % 10 == 0:
                log.info(
                    "refit %s #%d: %d labels, threshold %s (out-of-fold %.4f on %d labels above it,"
                    " %.4f on the %d of them drawn at random), %d waiting, %d auto-accepted,"
                    " %d held for people (sample or audit)",
                    project_id,
                    model.refits,
                    model.n_labels,
                    None if model.threshold is None else f"{model.threshold:.6f}",
                    model.estimated_accuracy,
                    model.support,
                    model.random_accuracy,
                    model.random_support,
                    len(waiting),
                    len(accepted_ids),
                    len(held),
                )

    def _refit_now(self, project_id: str) -> None:
        """Make the project's next refit due at once, whatever the refit interval."""
        self._dirty[project_id] = -math.inf
        self._wake.set()

    async def _withdraw_open_tasks(self, model: ProjectModel) -> None:
        """Take every waiting item's task out of review; the items stay waiting for the model."""
        project_id = model.project.project_id
        async with self._pool.acquire() as conn, conn.transaction():
            waiting = await repo.waiting_for_people(conn, project_id, all_but_synthetic=True)
            if not waiting:
                return
            await repo.publish(
                conn,
                self._outgoing(
                    project_id,
                    f"spent:{project_id}:{model.n_labels}",
                    [],
                    [],
                    sorted(w.item_id for w in waiting),
                ),
            )
        self._relay.notify()

    async def _waiting(self, model: ProjectModel, *, spent: bool) -> tuple[list[repo.Waiting], np.ndarray]:
        """Items a refit may still decide, with their feature rows."""
        async with self._pool.acquire() as conn:
            waiting = await repo.waiting_for_people(conn, model.project.project_id, all_but_synthetic=spent)
        if not waiting:
            return waiting, np.zeros((0, model.n_features))
        X = features(np.vstack([w.embedding for w in waiting]), np.vstack([w.zero_shot for w in waiting]))
        return waiting, X

    async def _finalize_below_target(
        self, model: ProjectModel, waiting: list[repo.Waiting], X: np.ndarray
    ) -> None:
        """The human budget is spent: what still waits gets the model's label, flagged below target."""
        if not waiting:
            return
        project = model.project
        decided = [
            (w.item_id, label, conf) for w, (label, conf) in zip(waiting, model.finalize(X), strict=True)
        ]
        async with self._pool.acquire() as conn, conn.transaction():
            done = await repo.accept_waiting(conn, decided, model.version, state="model", reason="budget")
            finals = [
                self._final(project, item_id, label, conf, model.version, below_target=True)
                for item_id, label, conf in decided
                if item_id in done
            ]
            await repo.publish(
                conn,
                self._outgoing(
                    project.project_id,
                    f"budget:{project.project_id}:{model.refits}",
                    [],
                    finals,
                    sorted(done),
                ),
            )
        self._relay.notify()
        DECISIONS.labels("budget").inc(len(done))
        log.info(
            "human budget of %s spent: %d waiting items finalized below target", project.project_id, len(done)
        )

    async def _request_second_opinions(self, model: ProjectModel) -> None:
        """Human labels the model contradicts with confidence go to someone else for a second look."""
        suspected = model.label_issues(self._settings.second_opinions_per_refit)
        if not suspected:
            return
        project = model.project
        suspected_label = dict(suspected)
        async with self._pool.acquire() as conn, conn.transaction():
            items = await repo.request_second_opinions(conn, suspected)
            tasks = [
                tasks_pb2.ReviewTask(
                    item_id=it.item_id,
                    project_id=project.project_id,
                    external_id=it.external_id,
                    text=it.text,
                    # Checking labels keeps the dataset right: ahead of new uncertain items.
                    priority=1.0,
                    reason=SECOND_OPINION,
                    # No suggestion: the second person must not be anchored on either answer.
                    synthetic=it.synthetic,
                    round=1,
                )
                for it in items
            ]
            await repo.publish(
                conn,
                self._outgoing(
                    project.project_id, f"second:{project.project_id}:{model.refits}", tasks, [], []
                ),
            )
        model.second_opinion_asked.update(suspected_label)
        self._relay.notify()
        SECOND_OPINIONS.inc(len(items))

    async def _publish_demonstrations(self, model: ProjectModel) -> None:
        """Few-shot demonstrations for LLM backends, from what people labeled (changed sets only)."""
        if self._fewshot is None or model.n_labels == 0:
            return
        project = model.project
        try:
            async with self._pool.acquire() as conn:
                pool = await repo.labeled_examples(conn, project.project_id, self._settings.fewshot_pool)
            demos = select_demonstrations(
                [text for _, text, _ in pool],
                [project.labels[label].name for _, _, label in pool],
                per_label=self._settings.fewshot_per_label,
                max_chars=self._settings.fewshot_max_chars,
                item_ids=[item_id for item_id, _, _ in pool],
            )
            ids = tuple(d.item_id for d in demos)
            if ids == self._demo_ids.get(project.project_id):
                return
            await self._fewshot.put(FewShotSet(project.project_id, model.refits, tuple(demos)))
            self._demo_ids[project.project_id] = ids
        except Exception:
            # Demonstrations improve prompts; their absence must never stop the scorer.
            log.warning("could not publish demonstrations for %s", project.project_id, exc_info=True)

    # -- messages ------------------------------------------------------------------------------

    @staticmethod
    def _task(
        project: ProjectSpec, item_id: str, external_id: str, text: str, r: repo.ItemDecision, synthetic: bool
    ) -> tasks_pb2.ReviewTask:
        return tasks_pb2.ReviewTask(
            item_id=item_id,
            project_id=project.project_id,
            external_id=external_id,
            text=text,
            priority=r.priority if not synthetic else 1.0,
            reason=r.reason,
            suggested_label=project.labels[r.label].name,
            confidence=r.confidence,
            synthetic=synthetic,
        )

    @staticmethod
    def _final(
        project: ProjectSpec,
        item_id: str,
        label: int,
        confidence: float,
        version: str,
        *,
        below_target: bool = False,
    ) -> labels_pb2.FinalLabel:
        return labels_pb2.FinalLabel(
            item_id=item_id,
            label=project.labels[label].name,
            source=labels_pb2.LABEL_SOURCE_MODEL if below_target else labels_pb2.LABEL_SOURCE_AUTO,
            confidence=confidence,
            model_version=version,
            finalized_unix_ms=_now_ms(),
            below_target=below_target,
        )

    def _outgoing(
        self,
        project_id: str,
        key: str,
        tasks: Sequence[tasks_pb2.ReviewTask],
        finals: Sequence[labels_pb2.FinalLabel],
        withdrawn: Sequence[str],
    ) -> list[Outgoing]:
        size = self._settings.publish_batch_items
        out: list[Outgoing] = []
        # Withdrawals first: review sees them before anything else this change causes.
        for i, ids in enumerate(_chunks(withdrawn, 1000)):
            out.append(
                Outgoing(
                    f"withdraw:{key}:{i}",
                    tasks_pb2.TaskWithdrawalBatch(batch_id=f"{key}:{i}", project_id=project_id, item_ids=ids),
                )
            )
        for i, part in enumerate(_chunks(tasks, size)):
            out.append(
                Outgoing(
                    f"tasks:{key}:{i}",
                    tasks_pb2.ReviewTaskBatch(batch_id=f"{key}:{i}", project_id=project_id, tasks=part),
                )
            )
        for i, fpart in enumerate(_chunks(finals, 500)):
            out.append(
                Outgoing(
                    f"final:{key}:{i}",
                    labels_pb2.FinalLabelBatch(batch_id=f"{key}:{i}", project_id=project_id, labels=fpart),
                )
            )
        return out

    # -- stats ---------------------------------------------------------------------------------

    async def stats(self, project_id: str) -> stats_pb2.ScorerStats:
        async with self._pool.acquire() as conn:
            c = await repo.counts(conn, project_id)
        model = self._models.get(project_id)
        out = stats_pb2.ScorerStats(
            predicted=c.predicted,
            auto_accepted=c.auto,
            in_review=c.in_review,
            human_labeled=c.human,
            audits=c.audits,
            withdrawn=c.withdrawn,
            audited=c.audited,
            below_target=c.below_target,
            control=c.control,
            second_opinions=c.second_opinions,
            relabeled=c.relabeled,
        )
        if c.audited:
            out.audit_accuracy = c.audit_correct / c.audited
            out.audit_accuracy_low = wilson_lower_bound(c.audit_correct, c.audited, 1.96)
            out.audit_accuracy_high = 1.0 - wilson_lower_bound(c.audited - c.audit_correct, c.audited, 1.96)
        if model is not None:
            out.refits = model.refits
            out.threshold = model.threshold or 0.0
            out.auto_accepting = model.threshold is not None
            out.estimated_auto_accuracy = model.estimated_accuracy
            out.target_accuracy = model.config.target_accuracy
            out.model_version = model.version
            out.audit_alarm = model.audit_alarm
            out.human_budget = model.project.human_budget(model.seen) or 0
        return out


class ScorerStatsServicer(stats_pb2_grpc.StatsServiceServicer):
    def __init__(self, scorer: Scorer) -> None:
        self._scorer = scorer

    async def GetProjectStats(
        self, request: stats_pb2.GetProjectStatsRequest, context: Context
    ) -> stats_pb2.ProjectStats:
        return stats_pb2.ProjectStats(
            project_id=request.project_id, scorer=await self._scorer.stats(request.project_id)
        )
