"""What the SDK hands back: plain dataclasses, so no caller ever sees a protobuf message."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.gen.tandem.export.v1 import export_pb2
from services.gen.tandem.projects.v1 import projects_pb2
from services.gen.tandem.stats.v1 import stats_pb2


@dataclass(frozen=True)
class Project:
    project_id: str
    labels: dict[str, str]  # name → description, in class order
    name: str = ""
    instructions: str = ""
    target_accuracy: float = 0.0
    guarantee: str = ""
    delta: float = 0.0
    created_unix_ms: int = 0

    @classmethod
    def from_proto(cls, p: projects_pb2.Project) -> Project:
        return cls(
            project_id=p.project_id,
            labels={lb.name: lb.description for lb in p.labels},
            name=p.name,
            instructions=p.instructions,
            target_accuracy=p.target_accuracy,
            guarantee=p.guarantee,
            delta=p.delta,
            created_unix_ms=p.created_unix_ms,
        )


@dataclass(frozen=True)
class Rejection:
    id: str
    reason: str


@dataclass(frozen=True)
class IngestSummary:
    accepted: int
    duplicates: int
    rejected: int
    # The service returns every rejected item with a reason a caller can act on.
    rejections: list[Rejection] = field(default_factory=list)


@dataclass(frozen=True)
class Status:
    """Where a project stands, merged from every service's stats."""

    project_id: str
    items: int  # ingested (accepted) items
    predicted: int  # pre-labeled by the model
    auto_accepted: int
    human_labeled: int
    in_review: int  # waiting for people
    finalized: int  # with a final label (what an export holds)
    target_accuracy: float
    certified_accuracy: float  # the guaranteed lower bound
    certified: bool  # certified_accuracy >= target_accuracy
    estimated_accuracy: float
    human_share: float

    @property
    def done(self) -> bool:
        """Every ingested item has a final label."""
        return self.items > 0 and self.finalized >= self.items

    @classmethod
    def from_proto(cls, s: stats_pb2.ProjectStats) -> Status:
        sc = s.scorer
        return cls(
            project_id=s.project_id,
            items=s.ingest.items,
            predicted=sc.predicted,
            auto_accepted=sc.auto_accepted,
            human_labeled=sc.human_labeled,
            in_review=sc.in_review,
            finalized=s.export.finalized,
            target_accuracy=sc.target_accuracy,
            certified_accuracy=sc.certified_accuracy,
            certified=sc.certified,
            estimated_accuracy=sc.estimated_accuracy,
            human_share=sc.human_share,
        )


EXPORT_STATES = {1: "building", 2: "ready", 3: "failed"}  # export_pb2.ExportState values


@dataclass(frozen=True)
class ExportInfo:
    """An export snapshot: a job that is "building" (rows_done of rows_total), then "ready" (with
    the SHA-256 of its canonical JSONL) or "failed" (see error)."""

    export_id: str
    project_id: str
    version: int
    state: str
    rows: int
    rows_done: int
    rows_total: int
    pending: int
    checksum: str
    error: str
    created_unix_ms: int
    ready_unix_ms: int
    expires_unix_ms: int  # 0 = never
    rows_by_source: dict[str, int] = field(default_factory=dict)
    rows_by_split: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, e: export_pb2.ExportInfo) -> ExportInfo:
        return cls(
            export_id=e.export_id,
            project_id=e.project_id,
            version=e.version,
            # An older service answers no state: its snapshots were complete when created.
            state=EXPORT_STATES.get(e.state, "ready"),
            rows=e.rows,
            rows_done=e.rows_done,
            rows_total=e.rows_total,
            pending=e.pending,
            checksum=e.checksum,
            error=e.error,
            created_unix_ms=e.created_unix_ms,
            ready_unix_ms=e.ready_unix_ms,
            expires_unix_ms=e.expires_unix_ms,
            rows_by_source=dict(e.rows_by_source),
            rows_by_split=dict(e.rows_by_split),
        )
