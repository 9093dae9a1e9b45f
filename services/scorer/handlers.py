"""Bus and gRPC edge of the scorer: predictions and human labels in; tasks, withdrawals and
automatic final labels out (through the outbox)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TypeVar

import asyncpg
import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from services.common.bus.outbox import OutboxRelay, Outgoing
from services.common.bus.worker import Delivery
from services.common.errors import PermanentError, RetryableError
from services.common.fewshot import FewShotSet, FewShotStore, select_demonstrations
from services.common.grpc_context import Context
from services.common.projects import ProjectDirectory, ProjectSpec
from services.gen.tandem.labels.v1 import labels_pb2
from services.gen.tandem.predictions.v1 import predictions_pb2
from services.gen.tandem.quality.v1 import quality_pb2
from services.gen.tandem.stats.v1 import stats_pb2, stats_pb2_grpc
from services.gen.tandem.tasks.v1 import tasks_pb2
from services.scorer import repo
from services.scorer.leases import ProjectLeases
from services.scorer.policy.certification import wilson_lower_bound
from services.scorer.policy.features import features
from services.scorer.policy.model import LRPolicyConfig
from services.scorer.policy.proposals import ACCEPTED, REJECTED, Entry
from services.scorer.policy.routing import AUDIT_PRIORITY, HANDED_BACK_PRIORITY
from services.scorer.service import ProjectModel, Rescored
from services.scorer.settings import ScorerSettings
from services.scorer.waiting import WaitingSet

log = logging.getLogger(__name__)

T = TypeVar("T")

DECISIONS = Counter("tandem_scorer_decisions_total", "Scorer decisions, by outcome.", ["outcome"])
REFITS = Counter("tandem_scorer_refits_total", "Model refits.")
REFIT_SECONDS = Histogram(
    "tandem_scorer_refit_seconds",
    "One refit: the fit, re-scoring a slice of the waiting items, writing what it decided.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
)
WAITING_LOAD_SECONDS = Histogram(
    "tandem_scorer_waiting_load_seconds",
    "Reading a project's waiting items from PostgreSQL into memory (once per model, not per refit).",
    buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 120, 300),
)
WAITING = Gauge("tandem_scorer_waiting_items", "Items kept in memory for re-scoring.", ["project"])
WAITING_BYTES = Gauge(
    "tandem_scorer_waiting_bytes", "Memory of the items kept for re-scoring (feature rows).", ["project"]
)
NOT_OWNER = Counter(
    "tandem_scorer_not_owner_total", "Messages handed back: their project is decided by another replica."
)
EVICTED = Counter("tandem_scorer_models_evicted_total", "Project models dropped for being idle.")
SLICE_FLAGS = Counter(
    "tandem_scorer_slice_flags_total", "Slices flagged by quality reports (their items get more audits)."
)
WITHDRAWN = Counter("tandem_scorer_withdrawn_total", "Review tasks withdrawn after a refit.")
SECOND_OPINIONS = Counter(
    "tandem_scorer_second_opinions_total", "Human labels sent for a second opinion (confident learning)."
)
SECOND_OPINION = "second_opinion"
# A human label confident learning doubts (Northcutt et al.): listed in the report's label-error
# review with its outcome.
LABEL_ERROR = "label_error"
SECOND_LOOKS = frozenset({SECOND_OPINION, LABEL_ERROR})
CERTIFIED = Gauge(
    "tandem_scorer_certified_accuracy", "Certified accuracy (lower bound) of the last refit.", ["project"]
)
ESTIMATED = Gauge("tandem_scorer_estimated_accuracy", "Estimated accuracy of the last refit.", ["project"])
# The accuracy alerts compare the two gauges above with this one.
TARGET = Gauge("tandem_scorer_target_accuracy", "The project's target accuracy.", ["project"])


def _now_ms() -> int:
    return int(time.time() * 1000)


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _check_embedding_size(model: ProjectModel, batch: predictions_pb2.PredictionBatch) -> None:
    """Refuse (dead-letter, nothing written) a batch embedded by another encoder than the project's
    first items: its rows would not fit the project's model, and every later refit would fail."""
    size = model.label_embeddings.shape[1]
    sizes = sorted({len(p.embedding) for p in batch.predictions} - {size})
    if sizes:
        raise PermanentError(
            f"predictions for project {batch.project_id!r} (model {batch.model_id!r}) carry embeddings of "
            f"{', '.join(map(str, sizes))} dimensions; the project's model uses {size}: its items were "
            "embedded by another encoder. Run inference with the encoder the project started with "
            "(TANDEM_INFERENCE_ENCODER); these items need predicting again with it"
        )


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
        # Per project, the waiting items a refit re-scores (services/scorer/waiting.py): loaded once
        # from PostgreSQL, then kept current by every handler that changes them.
        self._queues: dict[str, WaitingSet] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._dirty: dict[str, float] = {}  # project → monotonic time of the first unrefit label
        # Disagreeing audits found when a model was rebuilt whose second opinion was never asked.
        self._unasked: dict[str, list[tuple[str, int]]] = {}
        self._wake = asyncio.Event()
        # Message ids of refit decisions name the refit, whose counter starts again at 0 when a
        # model is rebuilt: without this process's own id, JetStream's duplicate window would
        # silently drop a restarted scorer's first decisions as repeats of the last run's.
        self._epoch = uuid.uuid4().hex[:12]
        self._leases = ProjectLeases(pool)
        self._used: dict[str, float] = {}  # project → monotonic time its model was last used

    async def _claim(self, project_id: str) -> None:
        """Go on only where this replica decides the project (services/scorer/leases.py)."""
        owned, lost = await self._leases.owns(project_id)
        if lost:
            # Another replica may have taken projects over meanwhile: their models here are stale.
            self._models.clear()
            self._queues.clear()
            self._dirty.clear()
        if not owned:
            NOT_OWNER.inc()
            raise RetryableError(
                f"project {project_id} is decided by another scorer replica",
                delay=self._settings.not_owner_retry_seconds,
                backoff=False,
            )
        self._used[project_id] = time.monotonic()

    async def _evict_idle(self) -> None:
        """Drop the models of projects idle for idle_evict_seconds, and give their leases up."""
        cutoff = time.monotonic() - self._settings.idle_evict_seconds
        for project_id in [p for p, t in self._used.items() if t < cutoff and p not in self._dirty]:
            async with self._lock(project_id):
                self._models.pop(project_id, None)
                self._queues.pop(project_id, None)
                self._used.pop(project_id, None)
                await self._leases.release(project_id)
            EVICTED.inc()
            log.info("model of %s evicted after %.0f s idle", project_id, self._settings.idle_evict_seconds)

    async def close(self) -> None:
        await self._leases.close()

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
            proposals = await repo.load_proposals(conn, project.project_id)
            c = await repo.counts(conn, project.project_id)
        model = ProjectModel(
            project, stored, self._policy, second_opinions=self._settings.second_opinions_per_refit > 0
        )
        model.seen, model.auto, model.model_labeled = c.predicted, c.auto, c.below_target
        model.second_opinion_asked = labeled.second_opinion_asked
        for p in proposals:
            entry = Entry(p.item_id, p.batch, p.label, p.audit_prob, p.audited, confidence=p.confidence)
            model.restore_proposal(entry, p.state)
        if len(labeled.y):
            adjudicate = model.add_labels(
                features(labeled.embeddings, labeled.zero_shot),
                labeled.y,
                labeled.item_ids,
                labeled.weights,
                check=False,
            )
            # add_labels saw the labels as they are now; the audit outcome rests on the first label.
            for p in proposals:
                if p.first_label is not None and p.second_label is not None:
                    model.book.record_label(p.item_id, p.first_label)
                    model.record_second_opinion(p.item_id, p.second_label)
            unasked = {p.item_id for p in proposals if not p.second_requested}
            waiting = [a for a in adjudicate if a[0] in unasked]
            weights = np.ones(len(labeled.y)) if labeled.weights is None else labeled.weights
            for item_id, check, weight in zip(
                labeled.item_ids, labeled.checks, weights.tolist(), strict=True
            ):
                against = check.checked_label
                asks = model.restore_check(
                    item_id, check.first, against, weight == 1.0, check.second, check.final
                )
                if asks and against is not None and item_id not in labeled.second_opinion_asked:
                    waiting.append((item_id, against))
            self._unasked[project.project_id] = list(dict(waiting).items())
        # Seconds on a large label space after a restart: off the event loop.
        await asyncio.to_thread(model.refit)
        self._models[project.project_id] = model
        self._refit_now(project.project_id)
        log.info(
            "model for %s ready: %d human labels, %d proposed, certified accuracy %.4f",
            project.project_id,
            model.n_labels,
            len(model.book.entries),
            model.certificate().lower_bound,
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
        await self._claim(project.project_id)
        async with self._lock(project.project_id):
            model = await self._model(project, label_emb, batch.model_id)
            _check_embedding_size(model, batch)
            await self._decide_new(project, model, batch, delivery.msg_id)

    async def _decide_new(
        self, project: ProjectSpec, model: ProjectModel, batch: predictions_pb2.PredictionBatch, msg_id: str
    ) -> None:
        X = np.vstack([np.asarray(p.embedding, dtype=np.float32) for p in batch.predictions])
        zero_shot = np.vstack([np.asarray(p.probs, dtype=np.float32) for p in batch.predictions])
        ids = [p.item_id for p in batch.predictions]
        labels, confidence, priority = model.decide(features(X, zero_shot), ids)
        spent = model.budget_spent(extra_seen=len(ids))
        reason = "uncertain" if model.ranks_by_ambiguity else "warmup"
        rows: list[repo.ItemDecision] = []
        for i, p in enumerate(batch.predictions):
            label, conf, prio = int(labels[i]), float(confidence[i]), float(priority[i])
            if p.synthetic:
                # Written by a model: never accepted without a person, budget or not.
                rows.append(repo.ItemDecision(p.item_id, "review", "synthetic", label, conf, 1.0))
            elif spent:
                rows.append(repo.ItemDecision(p.item_id, "model", "budget", label, conf, prio))
            elif model.is_control(p.item_id):
                # The random arm: people label it whatever the model thinks, served first.
                rows.append(repo.ItemDecision(p.item_id, "review", "control", label, conf, 1.0))
            else:
                # Acceptance goes through a proposal and its certificate at the next refit.
                rows.append(repo.ItemDecision(p.item_id, "review", reason, label, conf, prio))
        new_items = [
            repo.NewItem(
                item_id=p.item_id,
                external_id=p.external_id,
                text=p.text,
                synthetic=p.synthetic,
                embedding=X[i],
                zero_shot=list(p.probs),
                model_id=batch.model_id,
                metadata=dict(p.metadata),
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
        model.model_labeled += sum(1 for _, r in todo if r.state == "model")
        queue = self._queues.get(project.project_id)
        if queue is not None:
            waits = [
                i
                for i, (p, r) in enumerate(zip(batch.predictions, rows, strict=True))
                if p.item_id in fresh and r.state == "review" and r.reason not in repo.PEOPLE_ONLY
            ]
            if waits:
                queue.add(
                    [ids[i] for i in waits],
                    features(X[waits], zero_shot[waits]),
                    [float(priority[i]) for i in waits],
                    [queue.in_flagged_slice(dict(batch.predictions[i].metadata)) for i in waits],
                )
                WAITING.labels(project.project_id).set(len(queue))
                WAITING_BYTES.labels(project.project_id).set(queue.nbytes)
        self._relay.notify()
        for _, r in todo:
            DECISIONS.labels(r.reason).inc()
        if todo and model.ranks_by_ambiguity:
            # New items may be proposed for automatic acceptance at the next refit.
            self._dirty.setdefault(project.project_id, time.monotonic())
            self._wake.set()

    # -- human labels --------------------------------------------------------------------------

    async def on_human_labels(self, delivery: Delivery) -> None:
        batch = delivery.message
        assert isinstance(batch, labels_pb2.HumanLabelBatch)
        # With overlap, each person's label comes as it is given (pending) and the aggregate after
        # them: the model learns the aggregate only.
        settled = [lb for lb in batch.labels if not lb.pending]
        if not settled:
            return
        project = await self._projects.get(batch.project_id)
        names = project.label_names
        unknown = [lb.label for lb in settled if lb.label not in names]
        if unknown:
            raise PermanentError(f"labels {sorted(set(unknown))} are not in project {project.project_id!r}")
        await self._claim(project.project_id)
        firsts = [lb for lb in settled if lb.reason not in SECOND_LOOKS]
        seconds = [lb for lb in settled if lb.reason in SECOND_LOOKS]
        async with self._lock(project.project_id):
            model = await self._model(project)
            async with self._pool.acquire() as conn, conn.transaction():
                new = await repo.record_human_labels(
                    conn,
                    [(lb.item_id, names.index(lb.label), lb.annotator_id, lb.weight or 1.0) for lb in firsts],
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
            for o in opinions:
                # Settles a disagreeing audit: the disagreement stands unless they side with the model.
                model.record_second_opinion(o.item_id, o.second_label)
            if opinions and not new:
                self._dirty.setdefault(project.project_id, time.monotonic())
                self._wake.set()
            queue = self._queues.get(project.project_id)
            if queue is not None:
                queue.discard(n.item_id for n in new)
            if new:
                # Labels of tasks people held when the budget ran out keep arriving: their tasks
                # were withdrawn already.
                was_spent = model.budget_spent()
                blind = {lb.item_id for lb in firsts if lb.blind}
                adjudicate = model.add_labels(
                    features(np.vstack([n.embedding for n in new]), np.vstack([n.zero_shot for n in new])),
                    np.array([n.label for n in new]),
                    [n.item_id for n in new],
                    np.array([n.weight for n in new]),
                    blind=[n.item_id in blind for n in new],
                )
                checked = model.human_checks.checked_against([n.item_id for n in new])
                if checked:
                    # Before the second opinions: after a restart a check without its model label
                    # replays as an unchecked label (counted at h), never as a settled one.
                    async with self._pool.acquire() as conn:
                        await repo.record_checked_labels(conn, checked)
                await self._ask_second_opinions(model, adjudicate, f"adjudicate:{delivery.msg_id}")
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

    async def on_slice_flags(self, delivery: Delivery) -> None:
        """A quality report's flagged slices: their items get more audits from the next proposal
        on (applied in SQL where the waiting items are read, so no model needs to be loaded)."""
        msg = delivery.message
        assert isinstance(msg, quality_pb2.SliceFlags)
        flagged = [(f.field, f.value, list(f.reasons)) for f in msg.flagged]
        reported = datetime.fromtimestamp(msg.reported_unix_ms / 1000, tz=UTC)
        async with self._pool.acquire() as conn, conn.transaction():
            await repo.replace_slice_flags(conn, msg.project_id, list(msg.fields), flagged, reported)
        SLICE_FLAGS.inc(len(flagged))
        log.info(
            "quality report %s on %s flagged %s",
            msg.report_id,
            msg.project_id,
            [f"{f}={v}" for f, v, _ in flagged],
        )
        # Which waiting items are in a flagged slice is read again with them at the next refit.
        async with self._lock(msg.project_id):
            self._queues.pop(msg.project_id, None)
        if msg.project_id in self._models:
            self._dirty.setdefault(msg.project_id, time.monotonic())
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
            if not self._dirty:
                await self._check_quiet_labels()
            try:
                await self._evict_idle()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                log.warning("evicting idle models failed; will retry", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=0.25)

    async def _check_quiet_labels(self) -> None:
        """While no project waits for a refit, check the labels the last out-of-fold predictions
        missed (ProjectModel.labels_unchecked): a burst's last labels get their second opinions
        without every refit paying for the fold fits. Only projects that had no labels or
        predictions for five refit intervals: a check takes seconds, and while people are labeling
        the next refit must not wait for it. One project per pass."""
        quiet_since = time.monotonic() - 5 * self._settings.refit_seconds
        for project_id, model in list(self._models.items()):
            if self._used.get(project_id, 0.0) > quiet_since or not model.labels_unchecked():
                continue
            try:
                await asyncio.to_thread(model.check_labels)
                async with self._lock(project_id):
                    if self._models.get(project_id) is model:  # not evicted meanwhile
                        await self._request_second_opinions(model, f"check{model.classifier.oof_labels}")
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                # The database is away: the suspects are asked for at the next refit
                # (label_issues skips only those already asked).
                log.warning("second opinions of %s failed; will retry", project_id, exc_info=True)
            except Exception:
                # Not tried again until more labels are fitted (check_labels notes them first).
                log.exception("checking the labels of %s failed", project_id)
            return

    async def refit(self, project_id: str) -> None:
        started = time.monotonic()
        model = self._models[project_id]
        # The fits take seconds on large label spaces: in a worker thread and outside the project
        # lock, so human labels and predictions keep flowing in meanwhile (ProjectModel.refit fits
        # on the labels present when it starts). Only this loop refits, one project at a time.
        await asyncio.to_thread(model.refit)
        fit_seconds = time.monotonic() - started
        async with self._lock(project_id):
            REFITS.inc()
            unasked = self._unasked.pop(project_id, [])
            if unasked:
                await self._ask_second_opinions(
                    model, unasked, f"adjudicate:restart:{self._epoch}:{model.refits}"
                )
            spent = model.budget_spent()
            if spent and model.pending_labels:
                # Labels of tasks leased before the budget ran out came in during the fit.
                self._refit_now(project_id)
                return
            if spent:
                # Once per project: what still waits is finalized, read from PostgreSQL whole.
                self._queues.pop(project_id, None)
                waiting, X_waiting = await self._waiting(model, spent=spent)
                result = model.settle()
                accepted_ids = await self._apply(model, [w.item_id for w in waiting], result)
                done = set(accepted_ids)
                rest = [(w, x) for w, x in zip(waiting, X_waiting, strict=True) if w.item_id not in done]
                await self._finalize_below_target(
                    model,
                    [w for w, _ in rest],
                    np.vstack([x for _, x in rest]) if rest else X_waiting[:0],
                )
                return
            queue = await self._queue(model)
            # A refit's own cost: the fit, the slice and the writes (the one-time read of the
            # waiting items is timed apart, WAITING_LOAD_SECONDS).
            rescoring = time.monotonic()
            # A bounded slice per refit, round robin over the waiting items: a refit costs the
            # same at a million waiting items as at ten thousand, and every item is re-scored
            # once every len(queue) / rescore_slice_items refits.
            part = queue.next_slice(self._settings.rescore_slice_items)
            # The slice's predictions in a worker thread (with the neighbours' view on they compare
            # it with every labeled item): the lock keeps this project's handlers waiting, not the
            # event loop.
            probs = await asyncio.to_thread(model.predict_proba, part.X) if len(part.X) else None
            result = model.rescore(
                part.X,
                part.item_ids,
                part.priorities,
                part.flagged,
                part.draws,
                rerank_limit=self._settings.rerank_limit,
                probs=probs,
            )
            accepted_ids = await self._apply(model, part.item_ids, result)
            queue.discard(accepted_ids)
            queue.discard(e.item_id for e in result.proposed if e.audited)
            queue.set_priorities(
                [(part.item_ids[row], prio) for row, prio in result.reprioritize]
                + [(item_id, HANDED_BACK_PRIORITY) for item_id in result.handed_back]
            )
            WAITING.labels(project_id).set(len(queue))
            WAITING_BYTES.labels(project_id).set(queue.nbytes)
            REFIT_SECONDS.observe(fit_seconds + time.monotonic() - rescoring)
            waiting_count = len(queue)
            await self._request_second_opinions(model)
            await self._publish_demonstrations(model)
            if accepted_ids or result.proposed or model.refits % 10 == 0:
                cert = model.certificate()
                n_audited = sum(1 for e in result.proposed if e.audited)
                log.info(
                    "refit %s #%d (fit %.1fs): %d labels, %d waiting; proposed %d (%d audited),"
                    " accepted %d, handed back %d batches; %d automatic labels, certified %s accuracy"
                    " %.4f (target %.2f, delta %.2f), estimated %.4f",
                    project_id,
                    model.refits,
                    fit_seconds,
                    model.n_labels,
                    waiting_count,
                    len(result.proposed),
                    n_audited,
                    len(accepted_ids),
                    len(result.rejected_batches),
                    model.auto,
                    cert.guarantee.value,
                    cert.lower_bound,
                    cert.target,
                    cert.delta,
                    model.estimated_accuracy(),
                )

    async def _apply(self, model: ProjectModel, item_ids: list[str], result: Rescored) -> list[str]:
        """Write what a refit decided and publish it: proposals (audits go to people first), batch
        fates, accepted items' final labels, new priorities. Returns the accepted item ids."""
        project = model.project
        project_id = project.project_id
        proposed = [
            (e.item_id, e.label, e.audit_prob, e.audited, e.confidence, AUDIT_PRIORITY)
            for e in result.proposed
        ]
        accepted_batches = sorted(
            {e.batch for e in (model.book.latest(i) for i, _, _ in result.accept) if e is not None}
        )
        cert = model.certificate()
        async with self._pool.acquire() as conn, conn.transaction():
            await repo.save_model_state(
                conn, project_id, model.refits, cert.lower_bound, model.estimated_accuracy()
            )
            await repo.save_proposals(conn, project_id, result.batch, proposed)
            await repo.split_proposals(conn, project_id, result.splits)
            await repo.set_proposal_state(conn, project_id, result.rejected_batches, REJECTED)
            await repo.set_proposal_state(conn, project_id, accepted_batches, ACCEPTED)
            accepted_ids = await repo.accept_waiting(conn, result.accept, model.version)
            finals = [
                self._final(project, item_id, label, conf, model.version)
                for item_id, label, conf in result.accept
                if item_id in accepted_ids
            ]
            await repo.update_priorities(
                conn,
                [(item_ids[row], prio) for row, prio in result.reprioritize]
                + [(item_id, HANDED_BACK_PRIORITY) for item_id in result.handed_back],
            )
            # Re-ranking carries no text: the task exists in review already (see ReviewTask).
            tasks = (
                [
                    tasks_pb2.ReviewTask(
                        item_id=item_ids[row], project_id=project_id, priority=prio, reason="uncertain"
                    )
                    for row, prio in result.reprioritize
                ]
                + [
                    tasks_pb2.ReviewTask(
                        item_id=e.item_id, project_id=project_id, priority=AUDIT_PRIORITY, reason="audit"
                    )
                    for e in result.proposed
                    if e.audited
                ]
                + [
                    tasks_pb2.ReviewTask(
                        item_id=item_id,
                        project_id=project_id,
                        priority=HANDED_BACK_PRIORITY,
                        reason="handed_back",
                    )
                    for item_id in result.handed_back
                ]
            )
            await repo.publish(
                conn,
                self._outgoing(
                    project_id,
                    f"refit:{project_id}:{self._epoch}:{model.refits}",
                    tasks,
                    finals,
                    sorted(accepted_ids),
                ),
            )
        self._relay.notify()
        CERTIFIED.labels(project_id).set(cert.lower_bound)
        ESTIMATED.labels(project_id).set(model.estimated_accuracy())
        TARGET.labels(project_id).set(model.config.target_accuracy)
        WITHDRAWN.inc(len(accepted_ids))
        DECISIONS.labels("certified").inc(len(accepted_ids))
        DECISIONS.labels("audit").inc(sum(1 for e in result.proposed if e.audited))
        return sorted(accepted_ids)

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

    async def _queue(self, model: ProjectModel) -> WaitingSet:
        """The project's waiting items for re-scoring, read from PostgreSQL on first use (no text)."""
        project_id = model.project.project_id
        queue = self._queues.get(project_id)
        if queue is not None:
            return queue
        started = time.monotonic()
        async with self._pool.acquire() as conn, conn.transaction():
            flags = await repo.slice_flags(conn, project_id)
            queue = WaitingSet(model.n_features, [(f["field"], f["value"]) for f in flags])
            async for page in repo.waiting_pages(conn, project_id):
                queue.add(
                    page.item_ids, features(page.embeddings, page.zero_shot), page.priorities, page.flagged
                )
        self._queues[project_id] = queue
        WAITING_LOAD_SECONDS.observe(time.monotonic() - started)
        log.info(
            "%d waiting items of %s loaded for re-scoring (%.1f MiB)",
            len(queue),
            project_id,
            queue.nbytes / 2**20,
        )
        return queue

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
                    f"budget:{project.project_id}:{self._epoch}:{model.refits}",
                    [],
                    finals,
                    sorted(done),
                ),
            )
        self._relay.notify()
        model.model_labeled += len(done)
        DECISIONS.labels("budget").inc(len(done))
        log.info(
            "human budget of %s spent: %d waiting items finalized below target", project.project_id, len(done)
        )

    async def _request_second_opinions(self, model: ProjectModel, when: str = "") -> None:
        """Human labels the model contradicts with confidence go to someone else for a second look.
        `when` tells a quiet-time check's request apart from its refit's in the message id."""
        suspects = model.label_issues(self._settings.second_opinions_per_refit)
        await self._ask_second_opinions(
            model,
            [(s.item_id, s.label) for s in suspects],
            f"second:{model.project.project_id}:{self._epoch}:{model.refits}{when and ':' + when}",
            confidence={s.item_id: s.confidence for s in suspects},
        )

    async def _ask_second_opinions(
        self,
        model: ProjectModel,
        suspected: list[tuple[str, int]],
        key: str,
        confidence: dict[str, float] | None = None,
    ) -> None:
        """Send labeled items to someone else: (item id, the label the model suspects is right).
        Label-error audits (with the model's `confidence`: reason label_error, the model's label
        carried for the report, hidden from the person) and disagreeing audits of proposals
        (reason second_opinion) both go this way."""
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
                    reason=SECOND_OPINION if confidence is None else LABEL_ERROR,
                    # Never shown (review hides suggestions on both reasons): the second person
                    # must not be anchored on either answer. Carried for the export's report.
                    suggested_label=(
                        "" if confidence is None else project.labels[suspected_label[it.item_id]].name
                    ),
                    confidence=0.0 if confidence is None else confidence.get(it.item_id, 0.0),
                    synthetic=it.synthetic,
                    round=1,
                )
                for it in items
            ]
            await repo.publish(conn, self._outgoing(project.project_id, key, tasks, [], []))
        model.second_opinion_asked.update(item_id for item_id, _ in suspected)
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
            flags = await repo.slice_flags(conn, project_id)
        model = self._models.get(project_id)
        out = stats_pb2.ScorerStats(
            flagged_slices=[f"{f['field']}={f['value']}" for f in flags],
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
            out.target_accuracy = model.config.target_accuracy
            out.model_version = model.version
            out.human_budget = model.budget.limit(model.seen) or 0
            cert = model.certificate()
            out.guarantee = cert.guarantee.value
            out.certified_accuracy = cert.lower_bound
            out.certificate_delta = cert.delta
            out.certified = cert.met
            out.estimated_accuracy = model.estimated_accuracy()
            CERTIFIED.labels(project_id).set(out.certified_accuracy)
            ESTIMATED.labels(project_id).set(out.estimated_accuracy)
            TARGET.labels(project_id).set(out.target_accuracy)
            out.human_error_assumed = cert.human_error
            out.human_labels_checked = model.assumptions.blind
            out.human_errors_upper = cert.human_errors_upper
            decided = c.auto + c.human + c.below_target
            out.human_share = c.human / decided if decided else 0.0
            out.proposed_pending = c.pending
            out.audit_disagreements = model.book.audits()[1]
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
