"""`python -m services.inference`: pre-labels ingested items with the configured backend."""

from __future__ import annotations

from services.common.bus.topology import INFERENCE
from services.common.lifecycle import Runtime, run
from services.common.projects import ProjectDirectory
from services.inference.backend import LLMBackend
from services.inference.cpu_backend import CpuBackend
from services.inference.handlers import PrelabelHandler
from services.inference.settings import InferenceSettings


def build_backend(settings: InferenceSettings) -> LLMBackend:
    return CpuBackend(
        torch_threads=settings.torch_threads, batch_size=settings.batch_size, temperature=settings.temperature
    )


def main() -> None:
    settings = InferenceSettings()

    async def setup(rt: Runtime) -> None:
        backend = build_backend(settings)
        await backend.start()
        rt.add_closer(backend.close)
        handler = PrelabelHandler(backend, ProjectDirectory(rt.js), rt.js, settings.heartbeat_seconds)
        # One message at a time: a batch already keeps the model busy for seconds.
        rt.add_worker(INFERENCE, handler, fetch_batch=1)

    run("inference", settings, setup, schema=None)


if __name__ == "__main__":
    main()
