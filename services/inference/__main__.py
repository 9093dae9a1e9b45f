"""`python -m services.inference`: pre-labels ingested items with the configured backend."""

from __future__ import annotations

import asyncio
import contextlib

from services.common.bus.topology import INFERENCE
from services.common.fewshot import FewShotStore
from services.common.lifecycle import Runtime, run
from services.common.projects import ProjectDirectory
from services.gen.tandem.inference.v1 import inference_pb2_grpc
from services.inference.backend import EngineDeadError, LLMBackend
from services.inference.cpu_backend import CpuBackend
from services.inference.encoders import encoder_named
from services.inference.handlers import InferenceServicer, PrelabelHandler
from services.inference.prompts import DemoSource
from services.inference.settings import InferenceSettings


def build_backend(settings: InferenceSettings, demos: DemoSource | None = None) -> LLMBackend:
    if settings.backend == "replay":
        from services.inference.replay_backend import ReplayBackend

        return ReplayBackend()
    cpu = CpuBackend(
        encoder=encoder_named(settings.encoder),
        torch_threads=settings.torch_threads,
        batch_size=settings.batch_size,
        temperature=settings.temperature,
    )
    if settings.backend == "cpu":
        return cpu
    # The LLM backends give no embeddings of their own; the scorer's centroids need them, so the
    # sentence model runs next to the LLM unless it is switched off.
    embedder = cpu if settings.embedder == "sentence" else None
    if settings.backend == "vllm":
        # Imported here: the module is cheap, but keeps the CPU path free of anything vLLM.
        from services.inference.vllm_backend import VllmBackend, VllmConfig

        config = VllmConfig(
            model=settings.model,
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            tensor_parallel_size=settings.tensor_parallel_size,
            max_concurrency=settings.max_concurrency,
            kv_cache_bytes=settings.kv_cache_bytes,
            enforce_eager=settings.enforce_eager,
            block_size=settings.block_size,
            label_method=settings.label_method,
            generate_max_tokens=settings.generate_max_tokens,
        )
        return VllmBackend(config, embedder=embedder, demos=demos)
    from services.inference.openai_backend import OpenAIBackend, OpenAIConfig

    return OpenAIBackend(
        OpenAIConfig(
            base_url=settings.openai_base_url,
            api_key=settings.openai_api_key,
            model=settings.model,
            label_method=settings.label_method,
            max_concurrency=settings.max_concurrency,
            timeout_seconds=settings.openai_timeout_seconds,
            max_attempts=settings.openai_max_attempts,
            generate_max_tokens=settings.generate_max_tokens,
        ),
        embedder=embedder,
        demos=demos,
    )


async def watch_engine(backend: LLMBackend, rt: Runtime, stop: asyncio.Event, every: float = 2.0) -> None:
    """An engine can die while no batch is in flight; stop the service then too, so readiness
    fails and the orchestrator restarts it instead of leaving an idle worker that cannot label."""
    while not stop.is_set():
        if not backend.healthy():
            rt.fail(EngineDeadError(f"the {backend.model_id} engine is not healthy"))
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every)


def main() -> None:
    settings = InferenceSettings()

    async def setup(rt: Runtime) -> None:
        backend = build_backend(settings, FewShotStore(rt.js))
        await backend.start()
        rt.add_closer(backend.close)
        projects = ProjectDirectory(rt.js)
        handler = PrelabelHandler(
            backend, projects, rt.js, settings.heartbeat_seconds, max_bytes=settings.publish_max_bytes
        )
        # One message at a time: a batch already keeps the model busy for seconds (and the LLM
        # backends submit all its items at once).
        rt.add_worker(INFERENCE, handler, fetch_batch=1)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(
                backend, projects, default_temperature=settings.generate_temperature, on_fatal=rt.fail
            ),
            rt.grpc_server,
        )
        rt.add_background(lambda stop: watch_engine(backend, rt, stop))

    run("inference", settings, setup, schema=None)


if __name__ == "__main__":
    main()
