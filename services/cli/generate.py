"""`tandem generate`: synthetic examples of one label, written by the inference service's
generative backend and ingested flagged `synthetic` (the scorer sends every synthetic item to
people, and the export marks it)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from services.cli.client import Clients, channel
from services.gen.tandem.inference.v1 import inference_pb2, inference_pb2_grpc
from services.gen.tandem.ingest.v1 import ingest_pb2

# Writing text takes a while on a busy engine; this bounds one call, not one example.
GENERATE_TIMEOUT_SECONDS = 600.0


@dataclass(frozen=True)
class GenerateResult:
    texts: list[str]
    model_id: str
    accepted: int
    duplicates: int
    rejected: int


def synthetic_items(
    texts: list[str], label: str, model_id: str, prompt_hash: str
) -> list[ingest_pb2.RawItem]:
    """The id comes from the text: generating the same text twice is a duplicate, not a new item."""
    return [
        ingest_pb2.RawItem(
            external_id=f"synthetic-{hashlib.sha256(text.encode()).hexdigest()[:16]}",
            text=text.encode(),
            synthetic=True,
            metadata={"requested_label": label, "generator": model_id, "prompt_hash": prompt_hash},
        )
        for text in texts
    ]


async def generate_examples(
    clients: Clients,
    inference_target: str,
    *,
    project_id: str,
    label: str,
    count: int,
    seed: int = 0,
    temperature: float = 0.0,
) -> GenerateResult:
    """Asks the inference service for `count` examples of `label` and ingests them."""
    async with channel(inference_target, clients.token) as inference:
        stub = inference_pb2_grpc.InferenceServiceStub(inference)
        response = await stub.GenerateExamples(
            inference_pb2.GenerateExamplesRequest(
                project_id=project_id, label=label, count=count, seed=seed, temperature=temperature
            ),
            timeout=GENERATE_TIMEOUT_SECONDS,
        )
    items = synthetic_items(list(response.texts), label, response.model_id, response.prompt_hash)
    if not items:
        return GenerateResult([], response.model_id, 0, 0, 0)
    submitted = await clients.ingest.SubmitBatch(
        ingest_pb2.SubmitBatchRequest(project_id=project_id, items=items), timeout=60
    )
    return GenerateResult(
        list(response.texts), response.model_id, submitted.accepted, submitted.duplicates, submitted.rejected
    )
