"""GenerateExamples on the CPU default: a clear refusal, not a hang or an internal error."""

from __future__ import annotations

import grpc
import pytest
from nats.js import JetStreamContext

from services.common.bus.topology import FEWSHOT_BUCKET, apply_topology
from services.common.fewshot import Demonstration, FewShotSet, FewShotStore
from services.common.projects import LabelSpec, ProjectDirectory, ProjectSpec
from services.gen.tandem.inference.v1 import inference_pb2, inference_pb2_grpc
from services.inference.cpu_backend import CpuBackend
from services.inference.handlers import InferenceServicer

pytestmark = pytest.mark.integration

PROJECT = ProjectSpec("gen", "Gen", (LabelSpec("a", "A."), LabelSpec("b", "B.")), "", 0.9, 0.0)


async def test_cpu_backend_answers_failed_precondition(js: JetStreamContext) -> None:
    await apply_topology(js)
    projects = ProjectDirectory(js)
    await projects.put(PROJECT)
    server = grpc.aio.server()
    # Not started: generate() refuses before it would need the model.
    servicer = InferenceServicer(CpuBackend(), projects, default_temperature=0.8, on_fatal=lambda e: None)
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            codes = {}
            for name, request in {
                "cpu": inference_pb2.GenerateExamplesRequest(project_id="gen", label="a", count=2),
                "label": inference_pb2.GenerateExamplesRequest(project_id="gen", label="zz", count=2),
                "project": inference_pb2.GenerateExamplesRequest(project_id="nope", label="a", count=2),
                "count": inference_pb2.GenerateExamplesRequest(project_id="gen", label="a", count=0),
            }.items():
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.GenerateExamples(request, timeout=10)
                codes[name] = (err.value.code(), err.value.details())
    finally:
        await server.stop(None)
    assert codes["cpu"][0] == grpc.StatusCode.FAILED_PRECONDITION
    assert "the cpu backend cannot generate text" in (codes["cpu"][1] or "")
    assert codes["label"][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert codes["project"][0] == grpc.StatusCode.NOT_FOUND
    assert codes["count"][0] == grpc.StatusCode.INVALID_ARGUMENT


async def test_fewshot_store_round_trip(js: JetStreamContext) -> None:
    await apply_topology(js)
    assert (await js.key_value(FEWSHOT_BUCKET)) is not None
    store = FewShotStore(js, ttl_seconds=0)
    assert await store.get("gen") is None
    fewshot = FewShotSet("gen", 2, (Demonstration("i1", "text", "a"),))
    await store.put(fewshot)
    assert await FewShotStore(js).get("gen") == fewshot
