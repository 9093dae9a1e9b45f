"""Predictions of one input batch split by serialized size: embeddings make a labeled batch several
times its input's size, and NATS refuses a message over its max payload."""

from __future__ import annotations

from services.gen.tandem.predictions.v1 import predictions_pb2
from services.inference.handlers import split_by_size


def _prediction(i: int, dim: int = 384) -> predictions_pb2.Prediction:
    p = predictions_pb2.Prediction(item_id=f"00000000-0000-0000-0000-{i:012d}", text="x" * 150)
    p.probs.extend([0.25] * 4)
    p.embedding.extend([0.01 * (i % 7)] * dim)
    return p


def test_parts_stay_under_the_bound_and_keep_every_prediction_in_order() -> None:
    head = predictions_pb2.PredictionBatch(batch_id="b", project_id="p", model_id="m", prompt_hash="h")
    head.label_embeddings.extend([0.5] * 4 * 384)
    predictions = [_prediction(i, dim=768) for i in range(512)]
    parts = split_by_size(head, predictions, 300 * 1024)
    assert len(parts) > 1
    assert all(part.ByteSize() <= 300 * 1024 for part in parts)
    assert [p.item_id for part in parts for p in part.predictions] == [p.item_id for p in predictions]
    # Every part is a whole message: the scorer may see any of them first.
    assert all(part.batch_id == "b" and len(part.label_embeddings) == 4 * 384 for part in parts)


def test_a_small_batch_is_one_message() -> None:
    head = predictions_pb2.PredictionBatch(batch_id="b", project_id="p")
    parts = split_by_size(head, [_prediction(i) for i in range(64)], 900 * 1024)
    assert len(parts) == 1 and len(parts[0].predictions) == 64


def test_one_prediction_over_the_bound_still_goes_alone() -> None:
    head = predictions_pb2.PredictionBatch(batch_id="b", project_id="p")
    parts = split_by_size(head, [_prediction(0, dim=4096), _prediction(1)], 8 * 1024)
    assert [len(p.predictions) for p in parts] == [1, 1]
