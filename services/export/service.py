"""Pure rules of the export service."""

from __future__ import annotations

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
