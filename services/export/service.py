"""Pure rules of the export service."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

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


def expires_at(created: datetime, retention_hours: float) -> datetime | None:
    """When the sweeper deletes a snapshot created at `created`; None when it is kept forever."""
    return created + timedelta(hours=retention_hours) if retention_hours > 0 else None


# Job states as stored (export.exports.state).
BUILDING = "building"
READY = "ready"
FAILED = "failed"
INTERRUPTED = "interrupted by a restart"


@dataclass(frozen=True)
class ExportFilter:
    """Which final labels a snapshot keeps; every condition set must hold (unset: none).

    Times are unix milliseconds, 0 = unset, as in the contract; the filter is stored as this
    shape in JSON, so a snapshot says what it kept.
    """

    sources: tuple[str, ...] = ()
    min_confidence: float = 0.0
    finalized_after_ms: int = 0  # at or after
    finalized_before_ms: int = 0  # before
    metadata: Mapping[str, str] = field(default_factory=dict)
    certified_only: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "sources": list(self.sources),
            "min_confidence": self.min_confidence,
            "finalized_after_ms": self.finalized_after_ms,
            "finalized_before_ms": self.finalized_before_ms,
            "metadata": dict(self.metadata),
            "certified_only": self.certified_only,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExportFilter:
        # Snapshots made before filters existed store {}: every final label.
        return cls(
            sources=tuple(data.get("sources", ())),
            min_confidence=float(data.get("min_confidence", 0.0)),
            finalized_after_ms=int(data.get("finalized_after_ms", 0)),
            finalized_before_ms=int(data.get("finalized_before_ms", 0)),
            metadata=dict(data.get("metadata", {})),
            certified_only=bool(data.get("certified_only", False)),
        )


def filter_errors(f: ExportFilter) -> list[str]:
    """What is wrong with a filter, in words for the caller; empty when it is valid."""
    errors = []
    unknown = sorted(set(f.sources) - set(SOURCE_RANK))
    if unknown:
        errors.append(f"unknown sources {unknown}: use {sorted(SOURCE_RANK)}")
    if math.isnan(f.min_confidence) or not 0.0 <= f.min_confidence <= 1.0:
        errors.append(f"min_confidence must be between 0 and 1, not {f.min_confidence}")
    if f.finalized_after_ms < 0 or f.finalized_before_ms < 0:
        errors.append("finalized_after/before must be unix milliseconds (0 = unset)")
    if f.finalized_after_ms and f.finalized_before_ms and f.finalized_after_ms >= f.finalized_before_ms:
        errors.append("finalized_after must be before finalized_before")
    if any(not k.strip() for k in f.metadata):
        errors.append("metadata filter keys must not be empty")
    return errors
