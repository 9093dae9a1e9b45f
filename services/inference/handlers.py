"""Bus edge of the inference service: ItemBatch in, PredictionBatch out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.js import JetStreamContext
from prometheus_client import Counter, Histogram

from services.common.bus.contracts import Subject
from services.common.bus.worker import Delivery
from services.common.errors import RetryableError
from services.common.projects import ProjectDirectory
from services.gen.tandem.items.v1 import items_pb2
from services.gen.tandem.predictions.v1 import predictions_pb2
from services.inference.backend import LLMBackend

log = logging.getLogger(__name__)

ITEMS = Counter("tandem_inference_items_total", "Items pre-labeled.")
SECONDS = Histogram(
    "tandem_inference_batch_seconds",
    "Time to pre-label one bus batch.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)


class PrelabelHandler:
    def __init__(
        self, backend: LLMBackend, projects: ProjectDirectory, js: JetStreamContext, heartbeat_seconds: float
    ) -> None:
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
        out = predictions_pb2.PredictionBatch(
            batch_id=batch.batch_id,
            project_id=batch.project_id,
            model_id=self._backend.model_id,
            prompt_hash=result.prompt_hash,
            predicted_unix_ms=int(time.time() * 1000),
        )
        if result.label_embeddings is not None:
            out.label_embeddings.extend(result.label_embeddings.ravel().tolist())
        for i, item in enumerate(batch.items):
            prediction = out.predictions.add(
                item_id=item.item_id, external_id=item.external_id, text=item.text, synthetic=item.synthetic
            )
            prediction.probs.extend(result.probs[i].tolist())
            if result.embeddings is not None:
                prediction.embedding.extend(result.embeddings[i].tolist())
        try:
            # The id is derived from the input batch: a redelivered batch publishes a duplicate that
            # JetStream drops inside its duplicate window.
            await self._js.publish(
                str(Subject.PREDICTIONS_PRELABELED),
                out.SerializeToString(),
                headers={"Nats-Msg-Id": f"pred:{batch.batch_id}"},
            )
        except Exception as exc:
            raise RetryableError(f"cannot publish predictions: {exc}") from exc
        ITEMS.inc(len(batch.items))

    async def _heartbeat(self, delivery: Delivery) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_seconds)
            with contextlib.suppress(Exception):
                await delivery.heartbeat()
