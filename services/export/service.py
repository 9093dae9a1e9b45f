"""Pure rules of the export service."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.gen.tandem.labels.v1 import labels_pb2

SOURCE_NAMES = {
    labels_pb2.LABEL_SOURCE_AUTO: "auto",
    labels_pb2.LABEL_SOURCE_HUMAN: "human",
    labels_pb2.LABEL_SOURCE_CONSENSUS: "consensus",
    labels_pb2.LABEL_SOURCE_GOLD: "gold",
    labels_pb2.LABEL_SOURCE_MODEL: "model",
}

# A final label replaces an earlier one only when its source is at least as strong, so a late
# automatic label never overwrites a person's, whatever order the bus delivers them in.
SOURCE_RANK = {"model": 0, "auto": 1, "human": 2, "consensus": 3, "gold": 4}


def source_name(source: labels_pb2.LabelSource.ValueType) -> str:
    try:
        return SOURCE_NAMES[source]
    except KeyError:
        raise ValueError(f"final label with unknown source {source}") from None


@dataclass(frozen=True)
class RawLabel:
    """One person's own label on an item, as exported next to the final label."""

    item_id: str
    project_id: str
    task_id: str
    annotator_id: str
    pool_id: str
    label: str
    reason: str
    seconds_spent: float
    labeled_at: datetime
    model_label: str = ""  # the model's label the task carried ('' = none)
    model_confidence: float = 0.0  # the model's confidence in it (0 = none)


def person_of(pending: bool, annotator_id: str, annotator_ids: Sequence[str]) -> str | None:
    """Whose own label a published human label is, or None when it is nobody's alone.

    With overlap every person's label is published pending, and the aggregate of them follows
    (not pending, naming all its annotators): storing that one too would count a vote twice.
    Without overlap the one label is not pending and names one annotator at most.
    """
    if not pending and len(annotator_ids) > 1:
        return None
    person = annotator_id or (annotator_ids[0] if len(annotator_ids) == 1 else "")
    # Without an annotator the label cannot be attributed, and the key needs one.
    return person or None


def expiry_cutoff(now: datetime, retention_hours: float) -> datetime | None:
    """Snapshots created before this are expired; None when they are kept forever."""
    return now - timedelta(hours=retention_hours) if retention_hours > 0 else None
