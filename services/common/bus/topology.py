"""Streams and durable pull consumers, declared as code in one place and applied at start-up.

Every service applies the whole topology, so consumers exist before anything is published and
a changed setting here reaches the server on the next start (an existing consumer is updated,
never silently kept with its old config).

Streams and key-value buckets are replicated `replicas` times (TANDEM_NATS_STREAM_REPLICAS: 3 on
the 3-node cluster, 1 against a single nats-server in development and tests).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

from services.common.bus.contracts import DLQ_PREFIX, Subject

log = logging.getLogger(__name__)

DAY = 24 * 3600.0


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    max_age_seconds: float = 7 * DAY
    duplicate_window_seconds: float = 120.0


@dataclass(frozen=True)
class ConsumerSpec:
    name: str
    stream: str
    subjects: tuple[Subject, ...]
    # Long enough for one CPU labeler batch; handlers send in_progress() for slower work.
    ack_wait_seconds: float = 60.0
    # The retry budget: the worker naks with 1, 2, 4 … 60 s between deliveries, so 20 span
    # about 14 minutes — a PostgreSQL restart or a NATS leader election dead-letters nothing.
    max_deliver: int = 20
    max_ack_pending: int = 256
    backoff: tuple[float, ...] = field(default=())


STREAMS: tuple[StreamSpec, ...] = (
    StreamSpec("TANDEM_ITEMS", ("tandem.items.v1.>",)),
    StreamSpec("TANDEM_PREDICTIONS", ("tandem.predictions.v1.>",)),
    StreamSpec("TANDEM_TASKS", ("tandem.tasks.v1.>",)),
    StreamSpec("TANDEM_LABELS", ("tandem.labels.v1.>",)),
    StreamSpec("TANDEM_QUALITY", ("tandem.quality.v1.>",)),
    StreamSpec("TANDEM_DLQ", (f"{DLQ_PREFIX}.>",), max_age_seconds=30 * DAY),
)

INFERENCE = ConsumerSpec("inference", "TANDEM_ITEMS", (Subject.ITEMS_INGESTED,), max_ack_pending=64)
EXPORT_ITEMS = ConsumerSpec("export-items", "TANDEM_ITEMS", (Subject.ITEMS_INGESTED,))
SCORER_PREDICTIONS = ConsumerSpec(
    "scorer-predictions", "TANDEM_PREDICTIONS", (Subject.PREDICTIONS_PRELABELED,)
)
SCORER_LABELS = ConsumerSpec("scorer-labels", "TANDEM_LABELS", (Subject.LABELS_ANNOTATED,))
# One consumer for both task subjects keeps a withdrawal behind the request it withdraws.
REVIEW_TASKS = ConsumerSpec(
    "review-tasks", "TANDEM_TASKS", (Subject.TASKS_REVIEW_REQUESTED, Subject.TASKS_WITHDRAWN)
)
EXPORT_LABELS = ConsumerSpec("export-labels", "TANDEM_LABELS", (Subject.LABELS_FINALIZED,))
# Every person's label, for the export's raw labels (with overlap, several per item).
EXPORT_RAW_LABELS = ConsumerSpec("export-raw-labels", "TANDEM_LABELS", (Subject.LABELS_ANNOTATED,))
# Item metadata, for the skills a task needs (projects with skill fields only).
REVIEW_ITEMS = ConsumerSpec("review-items", "TANDEM_ITEMS", (Subject.ITEMS_INGESTED,))
# The labeler's model id, prompt hash and distribution, exported with each item.
EXPORT_PREDICTIONS = ConsumerSpec(
    "export-predictions", "TANDEM_PREDICTIONS", (Subject.PREDICTIONS_PRELABELED,)
)
# Slices a quality report flagged: the scorer audits their items more.
SCORER_SLICES = ConsumerSpec("scorer-slices", "TANDEM_QUALITY", (Subject.QUALITY_SLICES_FLAGGED,))

CONSUMERS: tuple[ConsumerSpec, ...] = (
    INFERENCE,
    EXPORT_ITEMS,
    SCORER_PREDICTIONS,
    SCORER_LABELS,
    REVIEW_TASKS,
    EXPORT_LABELS,
    EXPORT_RAW_LABELS,
    REVIEW_ITEMS,
    SCORER_SLICES,
    EXPORT_PREDICTIONS,
)

PROJECTS_BUCKET = "tandem_projects"
FEWSHOT_BUCKET = "tandem_fewshot"
# Token grants and principals, written by identity only (see services/common/auth.py).
IDENTITY_BUCKET = "tandem_identity"
BUCKETS: tuple[str, ...] = (PROJECTS_BUCKET, FEWSHOT_BUCKET, IDENTITY_BUCKET)

# JetStream's "stream name already in use with a different configuration".
_STREAM_NAME_IN_USE = 10058


def _stream_config(spec: StreamSpec, replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=spec.max_age_seconds,
        duplicate_window=spec.duplicate_window_seconds,
        num_replicas=replicas,
    )


def _consumer_config(spec: ConsumerSpec) -> ConsumerConfig:
    subjects = [str(s) for s in spec.subjects]
    return ConsumerConfig(
        name=spec.name,
        durable_name=spec.name,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=spec.ack_wait_seconds,
        max_deliver=spec.max_deliver,
        max_ack_pending=spec.max_ack_pending,
        filter_subject=subjects[0] if len(subjects) == 1 else None,
        filter_subjects=subjects if len(subjects) > 1 else None,
        backoff=list(spec.backoff) or None,
    )


async def apply_topology(js: JetStreamContext, replicas: int = 1) -> None:
    """Create or update every stream, consumer and bucket; safe to run concurrently.

    `replicas` is the JetStream replication factor of every stream and bucket; it must not exceed
    the number of servers in the cluster.
    """
    if replicas < 1:
        raise ValueError(f"stream replicas must be at least 1, got {replicas}")
    for stream in STREAMS:
        config = _stream_config(stream, replicas)
        try:
            await js.stream_info(stream.name)
        except NotFoundError:
            await js.add_stream(config)
        else:
            await js.update_stream(config)
    for consumer in CONSUMERS:
        # CONSUMER.CREATE with a name creates the consumer or updates its config.
        await js.add_consumer(consumer.stream, _consumer_config(consumer))
    for bucket in BUCKETS:
        await _ensure_bucket(js, bucket, replicas)
    log.debug(
        "topology applied: %d streams, %d consumers, %d buckets, replicas %d",
        len(STREAMS),
        len(CONSUMERS),
        len(BUCKETS),
        replicas,
    )


async def _ensure_bucket(js: JetStreamContext, bucket: str, replicas: int) -> None:
    try:
        await js.create_key_value(bucket=bucket, history=1, replicas=replicas)
    except BadRequestError as exc:
        # create_key_value only creates: a bucket made with another replica count (an earlier
        # setting) is updated in place, keeping the rest of its stream's config.
        if exc.err_code != _STREAM_NAME_IN_USE:
            raise
        info = await js.stream_info(f"KV_{bucket}")
        info.config.num_replicas = replicas
        await js.update_stream(info.config)
