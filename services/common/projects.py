"""Project definitions as every service sees them.

The ingest service owns projects in PostgreSQL and, after commit, puts each one into the
`tandem_projects` key-value bucket. Other services read them from there (no call to ingest on
their hot path, nothing to import from its package) through a small time-bounded cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from services.common.bus.topology import PROJECTS_BUCKET
from services.common.errors import UnknownProject
from services.gen.tandem.projects.v1 import projects_pb2


@dataclass(frozen=True)
class LabelSpec:
    name: str
    description: str


@dataclass(frozen=True)
class ProjectSpec:
    project_id: str
    name: str
    labels: tuple[LabelSpec, ...]
    instructions: str
    target_accuracy: float
    audit_rate: float
    human_budget_items: int = 0
    human_budget_share: float = 0.0
    control_rate: float = 0.0
    guarantee: str = "dataset"
    delta: float = 0.05
    human_error: float = 0.0
    created_by: str = ""
    hide_suggestions: bool = False
    # Workforce (see projects.proto): pools with their shares, skills, overlap, SLA, gold, quality bar.
    pools: tuple[tuple[str, float], ...] = ()
    skill_fields: tuple[str, ...] = ()
    overlap: int = 1
    max_overlap: int = 0
    overlap_below_confidence: float = 0.0
    sla_seconds: float = 0.0
    gold_first: int = 0
    gold_first_share: float = 0.0
    gold_share: float = 0.0
    quality_bar: float = 0.0

    @property
    def pool_ids(self) -> list[str]:
        return [pool_id for pool_id, _ in self.pools]

    @property
    def label_names(self) -> list[str]:
        return [label.name for label in self.labels]

    def label_index(self, name: str) -> int:
        return self.label_names.index(name)

    @classmethod
    def from_proto(cls, p: projects_pb2.Project) -> ProjectSpec:
        return cls(
            project_id=p.project_id,
            name=p.name,
            labels=tuple(LabelSpec(lb.name, lb.description) for lb in p.labels),
            instructions=p.instructions,
            target_accuracy=p.target_accuracy,
            audit_rate=p.audit_rate,
            human_budget_items=p.human_budget_items,
            human_budget_share=p.human_budget_share,
            control_rate=p.control_rate,
            guarantee=p.guarantee or "dataset",
            delta=p.delta or 0.05,
            human_error=p.human_error,
            created_by=p.created_by,
            hide_suggestions=p.hide_suggestions,
            pools=tuple((ps.pool_id, ps.share) for ps in p.pools),
            skill_fields=tuple(p.skill_fields),
            overlap=max(p.overlap, 1),
            max_overlap=p.max_overlap,
            overlap_below_confidence=p.overlap_below_confidence,
            sla_seconds=p.sla_seconds,
            gold_first=p.gold_first,
            gold_first_share=p.gold_first_share,
            gold_share=p.gold_share,
            quality_bar=p.quality_bar,
        )

    def to_proto(self) -> projects_pb2.Project:
        return projects_pb2.Project(
            project_id=self.project_id,
            name=self.name,
            labels=[projects_pb2.LabelDef(name=lb.name, description=lb.description) for lb in self.labels],
            instructions=self.instructions,
            target_accuracy=self.target_accuracy,
            audit_rate=self.audit_rate,
            human_budget_items=self.human_budget_items,
            human_budget_share=self.human_budget_share,
            control_rate=self.control_rate,
            guarantee=self.guarantee,
            delta=self.delta,
            human_error=self.human_error,
            created_by=self.created_by,
            hide_suggestions=self.hide_suggestions,
            pools=[projects_pb2.PoolShare(pool_id=pool_id, share=share) for pool_id, share in self.pools],
            skill_fields=list(self.skill_fields),
            overlap=self.overlap,
            max_overlap=self.max_overlap,
            overlap_below_confidence=self.overlap_below_confidence,
            sla_seconds=self.sla_seconds,
            gold_first=self.gold_first,
            gold_first_share=self.gold_first_share,
            gold_share=self.gold_share,
            quality_bar=self.quality_bar,
        )


class ProjectDirectory:
    def __init__(self, js: JetStreamContext, *, ttl_seconds: float = 10.0) -> None:
        self._js = js
        self._ttl = ttl_seconds
        self._kv: KeyValue | None = None
        self._cache: dict[str, tuple[float, ProjectSpec]] = {}

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self._js.key_value(PROJECTS_BUCKET)
        return self._kv

    async def get(self, project_id: str) -> ProjectSpec:
        cached = self._cache.get(project_id)
        now = time.monotonic()
        if cached is not None and now - cached[0] < self._ttl:
            return cached[1]
        try:
            entry = await (await self._bucket()).get(project_id)
        except KeyNotFoundError as exc:
            raise UnknownProject(project_id) from exc
        if entry.value is None:
            raise UnknownProject(project_id)
        proto = projects_pb2.Project()
        proto.ParseFromString(entry.value)
        spec = ProjectSpec.from_proto(proto)
        self._cache[project_id] = (now, spec)
        return spec

    async def put(self, spec: ProjectSpec) -> None:
        await (await self._bucket()).put(spec.project_id, spec.to_proto().SerializeToString())
        self._cache[spec.project_id] = (time.monotonic(), spec)
