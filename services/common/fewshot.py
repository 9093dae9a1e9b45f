"""Few-shot demonstrations: human-labeled items a prompting backend shows the model.

The scorer picks them after a refit (`select_demonstrations`) and puts one `FewShotSet` per
project into the `tandem_fewshot` key-value bucket; the inference backends read it through a
small time-bounded cache, the same way they read project definitions. A project without a set
is prompted zero-shot.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from services.common.bus.topology import FEWSHOT_BUCKET
from services.gen.tandem.fewshot.v1 import fewshot_pb2


@dataclass(frozen=True)
class Demonstration:
    item_id: str
    text: str
    label: str


@dataclass(frozen=True)
class FewShotSet:
    project_id: str
    version: int
    demos: tuple[Demonstration, ...]

    @classmethod
    def from_proto(cls, p: fewshot_pb2.FewShotSet) -> FewShotSet:
        return cls(
            project_id=p.project_id,
            version=p.version,
            demos=tuple(Demonstration(d.item_id, d.text, d.label) for d in p.demos),
        )

    def to_proto(self) -> fewshot_pb2.FewShotSet:
        return fewshot_pb2.FewShotSet(
            project_id=self.project_id,
            version=self.version,
            demos=[
                fewshot_pb2.Demonstration(item_id=d.item_id, text=d.text, label=d.label) for d in self.demos
            ],
        )


def _order_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0] if " " in text[:limit] else text[:limit]
    return cut.rstrip() + "…"


def select_demonstrations(
    texts: Sequence[str],
    labels: Sequence[str],
    per_label: int,
    max_chars: int,
    *,
    item_ids: Sequence[str] | None = None,
) -> list[Demonstration]:
    """A balanced, deterministic subset: up to `per_label` examples of every label.

    Candidates are ranked by a hash of their text rather than by arrival, so the same labeled
    data gives the same demonstrations in any order, and a new label changes the set only when it
    outranks a chosen one (a stable set keeps the backends' prefix cache warm). Texts that fit
    the per-demonstration share of `max_chars` are preferred; longer ones are clipped at a word.
    Labels are interleaved (a, b, c, a, b, c) so no label sits last in a long run, which would
    bias the model toward it.
    """
    if len(texts) != len(labels) or (item_ids is not None and len(item_ids) != len(texts)):
        raise ValueError("texts, labels and item_ids must have the same length")
    if per_label <= 0 or max_chars <= 0:
        return []
    by_label: dict[str, list[tuple[int, str]]] = {}
    seen: set[str] = set()
    for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
        clean = " ".join(text.split())
        if not clean or not label or clean in seen:
            continue
        seen.add(clean)
        by_label.setdefault(label, []).append((i, clean))
    if not by_label:
        return []
    share = max(max_chars // (per_label * len(by_label)), 1)
    chosen: dict[str, list[Demonstration]] = {}
    for label in sorted(by_label):
        ranked = sorted(by_label[label], key=lambda c: (len(c[1]) > share, _order_key(c[1])))
        chosen[label] = [
            Demonstration(item_ids[i] if item_ids is not None else "", _clip(text, share), label)
            for i, text in ranked[:per_label]
        ]
    out: list[Demonstration] = []
    for round_ in range(per_label):
        out.extend(demos[round_] for demos in chosen.values() if round_ < len(demos))
    return out


class FewShotStore:
    """Reads and writes the per-project sets in the `tandem_fewshot` bucket."""

    def __init__(self, js: JetStreamContext, *, ttl_seconds: float = 10.0) -> None:
        self._js = js
        self._ttl = ttl_seconds
        self._kv: KeyValue | None = None
        self._cache: dict[str, tuple[float, FewShotSet | None]] = {}

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self._js.key_value(FEWSHOT_BUCKET)
        return self._kv

    async def put(self, fewshot: FewShotSet) -> None:
        await (await self._bucket()).put(fewshot.project_id, fewshot.to_proto().SerializeToString())
        self._cache[fewshot.project_id] = (time.monotonic(), fewshot)

    async def get(self, project_id: str) -> FewShotSet | None:
        """The project's set, or None when none was put yet (the prompt is zero-shot)."""
        now = time.monotonic()
        cached = self._cache.get(project_id)
        if cached is not None and now - cached[0] < self._ttl:
            return cached[1]
        try:
            entry = await (await self._bucket()).get(project_id)
        except KeyNotFoundError:
            entry = None
        found: FewShotSet | None = None
        if entry is not None and entry.value:
            proto = fewshot_pb2.FewShotSet()
            proto.ParseFromString(entry.value)
            found = FewShotSet.from_proto(proto)
        self._cache[project_id] = (now, found)
        return found
