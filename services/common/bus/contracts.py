"""The bus contract: every subject carries exactly one protobuf message type."""

from __future__ import annotations

from enum import StrEnum

from google.protobuf.message import DecodeError, Message

from services.common.errors import PoisonMessage
from services.gen.tandem.items.v1 import items_pb2
from services.gen.tandem.labels.v1 import labels_pb2
from services.gen.tandem.predictions.v1 import predictions_pb2
from services.gen.tandem.quality.v1 import quality_pb2
from services.gen.tandem.tasks.v1 import tasks_pb2


class Subject(StrEnum):
    ITEMS_INGESTED = "tandem.items.v1.ingested"
    PREDICTIONS_PRELABELED = "tandem.predictions.v1.prelabeled"
    TASKS_REVIEW_REQUESTED = "tandem.tasks.v1.review_requested"
    TASKS_WITHDRAWN = "tandem.tasks.v1.withdrawn"
    LABELS_ANNOTATED = "tandem.labels.v1.annotated"
    LABELS_FINALIZED = "tandem.labels.v1.finalized"
    QUALITY_SLICES_FLAGGED = "tandem.quality.v1.slices_flagged"


MESSAGE_TYPES: dict[Subject, type[Message]] = {
    Subject.ITEMS_INGESTED: items_pb2.ItemBatch,
    Subject.PREDICTIONS_PRELABELED: predictions_pb2.PredictionBatch,
    Subject.TASKS_REVIEW_REQUESTED: tasks_pb2.ReviewTaskBatch,
    Subject.TASKS_WITHDRAWN: tasks_pb2.TaskWithdrawalBatch,
    Subject.LABELS_ANNOTATED: labels_pb2.HumanLabelBatch,
    Subject.LABELS_FINALIZED: labels_pb2.FinalLabelBatch,
    Subject.QUALITY_SLICES_FLAGGED: quality_pb2.SliceFlags,
}

DLQ_PREFIX = "tandem.dlq"


def dlq_subject(consumer: str) -> str:
    return f"{DLQ_PREFIX}.{consumer}"


def subject_for(message: Message) -> Subject:
    for subject, message_type in MESSAGE_TYPES.items():
        if isinstance(message, message_type):
            return subject
    raise TypeError(f"{type(message).__name__} is not a bus message type")


def decode(subject: str, data: bytes) -> tuple[Subject, Message]:
    """Decode a payload by its subject; anything that does not fit is a poison message."""
    try:
        known = Subject(subject)
    except ValueError as exc:
        raise PoisonMessage(f"no message type is mapped to subject {subject!r}") from exc
    message = MESSAGE_TYPES[known]()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise PoisonMessage(f"payload is not a valid {type(message).__name__}: {exc}") from exc
    return known, message
