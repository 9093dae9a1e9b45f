"""Edges of the inference service: ItemBatch in, PredictionBatch out (bus); GenerateExamples (gRPC)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable

import grpc
from nats.js import JetStreamContext
from prometheus_client import Counter, Histogram

from services.common.bus.contracts import Subject
from services.common.bus.worker import Delivery
from services.common.errors import FatalError, RetryableError, UnknownProject
from services.common.grpc_context import Context
from services.common.projects import ProjectDirectory, ProjectSpec
from services.gen.tandem.inference.v1 import inference_pb2, inference_pb2_grpc
from services.gen.tandem.items.v1 import items_pb2
from services.gen.tandem.predictions.v1 import predictions_pb2
from services.inference.backend import BackendRequestError, GenerationUnsupported, LLMBackend
from services.inference.prompts import generation_messages

log = logging.getLogger(__name__)

ITEMS = Counter("tandem_inference_items_total", "Items pre-labeled.")
SECONDS = Histogram(
    "tandem_inference_batch_seconds",
    "Time to pre-label one bus batch.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
GENERATED = Counter("tandem_inference_generated_examples_total", "Synthetic examples written.")
MAX_GENERATE = 256


def split_by_size(
    head: predictions_pb2.PredictionBatch, predictions: list[predictions_pb2.Prediction], max_bytes: int
) -> list[predictions_pb2.PredictionBatch]:
    """The predictions of one input batch in messages of at most about `max_bytes` each (every one
    with the head's fields): embeddings make a prediction several times its item's size, so an input
    batch that fits NATS' payload limit may not fit it once labeled."""
    parts: list[predictions_pb2.PredictionBatch] = []
    budget = max_bytes - head.ByteSize()
    out, size = None, 0
    for prediction in predictions:
        # A repeated field costs its bytes plus a tag and a length prefix (at most 1 + 5 bytes).
        cost = prediction.ByteSize() + 6
        if out is None or (size + cost > budget and len(out.predictions) > 0):
            out = predictions_pb2.PredictionBatch()
            out.CopyFrom(head)
            parts.append(out)
            size = 0
        out.predictions.append(prediction)
        size += cost
    return parts


class PrelabelHandler:
    def __init__(
        self,
        backend: LLMBackend,
        projects: ProjectDirectory,
        js: JetStreamContext,
        heartbeat_seconds: float,
        max_bytes: int = 900 * 1024,
    ) -> None:
        self._max_bytes = max_bytes
        self._backend = backend
        self._projects = projects
        self._js = js
        self._heartbeat_seconds = heartbeat_seconds

    async def __call__(self, delivery: Delivery) -> None:
        batch = delivery.message
        assert isinstance(batch, items_pb2.ItemBatch)
        if not batch.items:
            return
        project = await self._projects.get(batch.project_id)
        started = time.perf_counter()
        beat = asyncio.create_task(self._heartbeat(delivery))
        try:
            result = await self._backend.prelabel(project, [it.text for it in batch.items])
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
        SECONDS.observe(time.perf_counter() - started)
        head = predictions_pb2.PredictionBatch(
            batch_id=batch.batch_id,
            project_id=batch.project_id,
            model_id=self._backend.model_id,
            prompt_hash=result.prompt_hash,
            predicted_unix_ms=int(time.time() * 1000),
        )
        if result.label_embeddings is not None:
            head.label_embeddings.extend(result.label_embeddings.ravel().tolist())
        predictions = []
        for i, item in enumerate(batch.items):
            prediction = predictions_pb2.Prediction(
                item_id=item.item_id,
                external_id=item.external_id,
                text=item.text,
                synthetic=item.synthetic,
                metadata=dict(item.metadata),
            )
            prediction.probs.extend(result.probs[i].tolist())
            if result.embeddings is not None:
                prediction.embedding.extend(result.embeddings[i].tolist())
            predictions.append(prediction)
        for part, out in enumerate(split_by_size(head, predictions, self._max_bytes)):
            try:
                # The id is derived from the input batch: a redelivered batch publishes duplicates
                # that JetStream drops inside its duplicate window.
                await self._js.publish(
                    str(Subject.PREDICTIONS_PRELABELED),
                    out.SerializeToString(),
                    headers={"Nats-Msg-Id": f"pred:{batch.batch_id}" + (f":{part}" if part else "")},
                )
            except Exception as exc:
                raise RetryableError(f"cannot publish predictions: {exc}") from exc
        ITEMS.inc(len(batch.items))

    async def _heartbeat(self, delivery: Delivery) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_seconds)
            with contextlib.suppress(Exception):
                await delivery.heartbeat()


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(
        self,
        backend: LLMBackend,
        projects: ProjectDirectory,
        *,
        default_temperature: float,
        on_fatal: Callable[[BaseException], None],
    ) -> None:
        self._backend = backend
        self._projects = projects
        self._default_temperature = default_temperature
        self._on_fatal = on_fatal

    async def GenerateExamples(
        self, request: inference_pb2.GenerateExamplesRequest, context: Context
    ) -> inference_pb2.GenerateExamplesResponse:
        if not request.project_id or not request.label:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "project_id and label are required")
        if not 1 <= request.count <= MAX_GENERATE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"count must be 1..{MAX_GENERATE}")
        try:
            project = await self._projects.get(request.project_id)
        except UnknownProject as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        if request.label not in project.label_names:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{request.label!r} is not a label of {project.project_id!r} "
                f"(labels: {', '.join(project.label_names)})",
            )
        try:
            texts = await self._backend.generate(
                project,
                request.label,
                count=request.count,
                seed=request.seed,
                temperature=request.temperature or self._default_temperature,
            )
        except GenerationUnsupported as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except BackendRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except RetryableError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except FatalError as exc:
            self._on_fatal(exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the model engine stopped: {exc}")
        GENERATED.inc(len(texts))
        return inference_pb2.GenerateExamplesResponse(
            texts=texts, model_id=self._backend.model_id, prompt_hash=_generation_hash(project, request.label)
        )


def _generation_hash(project: ProjectSpec, label: str) -> str:
    messages = generation_messages(project, label)
    return hashlib.sha256(repr(messages).encode()).hexdigest()[:16]
