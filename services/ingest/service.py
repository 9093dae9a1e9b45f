"""Pure domain logic of ingest: validation at the edge, content hashing, project rules."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from services.common.projects import LabelSpec, ProjectSpec

PROJECT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
MAX_EXTERNAL_ID_CHARS = 256
DEFAULT_TARGET_ACCURACY = 0.95
DEFAULT_AUDIT_RATE = 0.0  # sized to the pool by the scorer
GUARANTEES = ("dataset", "automatic")


class InvalidProject(ValueError):
    """A project definition a client must fix."""


@dataclass(frozen=True)
class Limits:
    max_text_bytes: int
    max_metadata_keys: int
    max_metadata_value_chars: int


@dataclass(frozen=True)
class RawItem:
    external_id: str
    text: bytes
    metadata: dict[str, str]
    synthetic: bool
    project_id: str


@dataclass(frozen=True)
class ValidItem:
    index: int  # position in the request, so answers keep the request's order
    project_id: str
    external_id: str
    text: str
    metadata: dict[str, str]
    synthetic: bool
    content_hash: str


@dataclass(frozen=True)
class Rejection:
    index: int
    project_id: str
    external_id: str
    reason: str
    raw: bytes


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


@dataclass
class ItemAnswer:
    external_id: str
    outcome: Outcome
    item_id: str = ""
    reason: str = ""


@dataclass
class Screened:
    valid: list[ValidItem] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


def normalize_for_hash(text: str) -> str:
    """Texts that differ only in Unicode form or white space are the same item."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def content_hash(text: str) -> str:
    return hashlib.sha256(normalize_for_hash(text).encode("utf-8")).hexdigest()


def check_item(raw: RawItem, limits: Limits) -> str:
    """Returns the decoded text, or raises ValueError with a reason a client can act on."""
    if len(raw.text) > limits.max_text_bytes:
        raise ValueError(f"text is {len(raw.text):,} bytes; the limit is {limits.max_text_bytes:,}")
    try:
        text = raw.text.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw.text[exc.start : exc.start + 1].hex()
        raise ValueError(f"text is not valid UTF-8 (byte 0x{bad} at offset {exc.start})") from exc
    if not text.strip():
        raise ValueError("text is empty")
    if "\x00" in text:
        raise ValueError("text contains a NUL character")
    if len(raw.external_id) > MAX_EXTERNAL_ID_CHARS:
        raise ValueError(f"external_id is longer than {MAX_EXTERNAL_ID_CHARS} characters")
    # PostgreSQL text and jsonb refuse NUL: caught here, one item is refused, not the request.
    if "\x00" in raw.external_id:
        raise ValueError("external_id contains a NUL character")
    if len(raw.metadata) > limits.max_metadata_keys:
        raise ValueError(f"metadata has {len(raw.metadata)} keys; the limit is {limits.max_metadata_keys}")
    for key, value in raw.metadata.items():
        if not key or len(key) > 64:
            raise ValueError(f"metadata key {key[:64]!r} must be 1 to 64 characters")
        if len(value) > limits.max_metadata_value_chars:
            raise ValueError(
                f"metadata value for {key!r} is longer than {limits.max_metadata_value_chars} characters"
            )
        if "\x00" in key or "\x00" in value:
            raise ValueError(f"metadata {key!r} contains a NUL character")
    return text


def screen(items: Sequence[RawItem], known_projects: set[str], limits: Limits) -> Screened:
    """Split a request into items to store and items to reject, keeping the request order."""
    out = Screened()
    for index, raw in enumerate(items):
        external_id = raw.external_id or f"#{index}"
        try:
            if raw.project_id not in known_projects:
                raise ValueError(f"unknown project {raw.project_id!r}")
            text = check_item(raw, limits)
        except ValueError as exc:
            out.rejected.append(Rejection(index, raw.project_id, external_id, str(exc), raw.text))
            continue
        out.valid.append(
            ValidItem(
                index=index,
                project_id=raw.project_id,
                external_id=raw.external_id,
                text=text,
                metadata=dict(raw.metadata),
                synthetic=raw.synthetic,
                content_hash=content_hash(text),
            )
        )
    return out


# What an item costs in a bus message beyond the strings counted: item id (and as the external id
# when none was given), time, flags, field tags and lengths.
ITEM_OVERHEAD_BYTES = 128


def serialized_size(item: ValidItem) -> int:
    """An upper estimate of the item's bytes in an ItemBatch: every string it carries (text,
    external id, metadata keys and values) plus the fixed fields."""
    meta = sum(len(k.encode("utf-8")) + len(v.encode("utf-8")) + 8 for k, v in item.metadata.items())
    return (
        len(item.text.encode("utf-8"))
        + len(item.external_id.encode("utf-8"))
        + len(item.project_id)
        + len(item.content_hash)
        + meta
        + ITEM_OVERHEAD_BYTES
    )


def chunk(items: Sequence[ValidItem], max_items: int, max_bytes: int) -> Iterator[list[ValidItem]]:
    """Bus batches bounded by count and by serialized size (NATS refuses payloads over its
    max_payload, 1 MiB by default: one oversized batch would block the outbox for everyone)."""
    current: list[ValidItem] = []
    size = 0
    for item in items:
        item_size = serialized_size(item)
        if current and (len(current) >= max_items or size + item_size > max_bytes):
            yield current
            current, size = [], 0
        current.append(item)
        size += item_size
    if current:
        yield current


def validate_project(spec: ProjectSpec) -> ProjectSpec:
    """Check a project definition and fill its defaults."""
    if not PROJECT_ID_RE.match(spec.project_id):
        raise InvalidProject(
            "project_id must be 1-63 characters of a-z, 0-9, '-' or '_', starting with a letter or digit"
        )
    names = [label.name.strip() for label in spec.labels]
    if len(names) < 2:
        raise InvalidProject("a project needs at least two labels")
    if any(not n for n in names):
        raise InvalidProject("label names must not be empty")
    if len(set(names)) != len(names):
        raise InvalidProject("label names must be unique")
    target = spec.target_accuracy or DEFAULT_TARGET_ACCURACY
    if not 0.5 <= target < 1.0:
        raise InvalidProject("target_accuracy must be in [0.5, 1.0)")
    audit = spec.audit_rate or DEFAULT_AUDIT_RATE
    if not 0.0 <= audit <= 0.5:
        raise InvalidProject("audit_rate must be in [0, 0.5]")
    if spec.human_budget_items < 0:
        raise InvalidProject("human_budget_items must not be negative")
    if not 0.0 <= spec.human_budget_share <= 1.0:
        raise InvalidProject("human_budget_share must be in [0, 1]")
    if not 0.0 <= spec.control_rate <= 1.0:
        # 1.0 is the random-review baseline of `tandem bench labeling`.
        raise InvalidProject("control_rate must be in [0, 1]")
    guarantee = spec.guarantee or "dataset"
    if guarantee not in GUARANTEES:
        raise InvalidProject(f"guarantee must be one of {', '.join(GUARANTEES)}")
    delta = spec.delta or 0.05
    if not 0.0 < delta <= 0.5:
        raise InvalidProject("delta must be in (0, 0.5]")
    if not 0.0 <= spec.human_error < 0.5:
        raise InvalidProject("human_error must be in [0, 0.5)")
    if guarantee == "dataset" and spec.human_error > 1.0 - target and not spec.hide_suggestions:
        # Even a dataset labeled entirely by people would miss the target. People who label blind
        # have every label the model disagrees with checked by a second person, which can.
        raise InvalidProject(
            f"a dataset target of {target} cannot be met by people who err at {spec.human_error}"
            " unless they label blind (hide_suggestions: disagreements with the model then go to a"
            " second person)"
        )
    _validate_workforce(spec)
    return ProjectSpec(
        project_id=spec.project_id,
        name=spec.name or spec.project_id,
        labels=tuple(
            LabelSpec(n, label.description.strip()) for n, label in zip(names, spec.labels, strict=True)
        ),
        instructions=spec.instructions,
        target_accuracy=target,
        audit_rate=audit,
        human_budget_items=spec.human_budget_items,
        human_budget_share=spec.human_budget_share,
        control_rate=spec.control_rate,
        guarantee=guarantee,
        delta=delta,
        human_error=spec.human_error,
        created_by=spec.created_by,
        hide_suggestions=spec.hide_suggestions,
        pools=tuple((pool_id.strip(), share) for pool_id, share in spec.pools),
        skill_fields=tuple(f.strip() for f in spec.skill_fields),
        overlap=max(spec.overlap, 1),
        max_overlap=spec.max_overlap,
        overlap_below_confidence=spec.overlap_below_confidence,
        sla_seconds=spec.sla_seconds,
        gold_first=spec.gold_first,
        gold_first_share=spec.gold_first_share,
        gold_share=spec.gold_share,
        quality_bar=spec.quality_bar,
    )


MAX_OVERLAP = 10


def _validate_workforce(spec: ProjectSpec) -> None:
    ids = [pool_id.strip() for pool_id, _ in spec.pools]
    if any(not PROJECT_ID_RE.match(pool_id) for pool_id in ids):
        raise InvalidProject("pool ids must be 1-63 characters of a-z, 0-9, '-' or '_'")
    if len(set(ids)) != len(ids):
        raise InvalidProject("each pool may be named once")
    if any(not share > 0 for _, share in spec.pools):
        raise InvalidProject("each pool's share must be above 0")
    if any(not f.strip() or "=" in f for f in spec.skill_fields):
        raise InvalidProject("skill fields must be metadata field names (no '=')")
    if not 0 <= spec.overlap <= MAX_OVERLAP:
        raise InvalidProject(f"overlap must be in [1, {MAX_OVERLAP}]")
    if spec.max_overlap and not max(spec.overlap, 1) <= spec.max_overlap <= MAX_OVERLAP:
        raise InvalidProject(f"max_overlap must be 0 (no dynamic overlap) or in [overlap, {MAX_OVERLAP}]")
    if not 0.0 <= spec.overlap_below_confidence <= 1.0:
        raise InvalidProject("overlap_below_confidence must be in [0, 1]")
    if not 0.0 <= spec.sla_seconds <= 365 * 86400:
        raise InvalidProject("sla_seconds must be in [0, one year]")
    if not 0 <= spec.gold_first <= 1000:
        raise InvalidProject("gold_first must be in [0, 1000]")
    for name in ("gold_first_share", "gold_share", "quality_bar"):
        if not 0.0 <= getattr(spec, name) <= 1.0:
            raise InvalidProject(f"{name} must be in [0, 1]")


# What may change once items flow. The labels' names and order index every stored distribution,
# and the target, guarantee, delta and assumed human error are what the running certificate
# tests: changing them mid-run would test a different promise on evidence gathered for another.
EDITABLE_FIELDS = (
    "name",
    "instructions",
    "label_descriptions",
    "hide_suggestions",
    "human_budget_items",
    "human_budget_share",
    # The workforce settles who labels, not what is certified: all of it may change.
    "pools",
    "skill_fields",
    "overlap",
    "max_overlap",
    "overlap_below_confidence",
    "sla_seconds",
    "gold_first",
    "gold_first_share",
    "gold_share",
    "quality_bar",
)


def edit_project(current: ProjectSpec, changes: ProjectSpec, fields: Iterable[str]) -> ProjectSpec:
    """`current` with the named fields taken from `changes`, validated like a new project."""
    fields = list(dict.fromkeys(fields))
    fixed = [f for f in fields if f not in EDITABLE_FIELDS]
    if fixed:
        raise InvalidProject(
            f"{', '.join(fixed)} cannot change after creation (editable: {', '.join(EDITABLE_FIELDS)})"
        )
    if not fields:
        raise InvalidProject(f"name the fields to change (editable: {', '.join(EDITABLE_FIELDS)})")
    edited = current
    for name in fields:
        if name == "label_descriptions":
            if [lb.name for lb in changes.labels] != current.label_names:
                raise InvalidProject(
                    "label_descriptions must list the project's labels, same names, same order: "
                    + ", ".join(current.label_names)
                )
            edited = dataclasses.replace(edited, labels=changes.labels)
        else:
            edited = dataclasses.replace(edited, **{name: getattr(changes, name)})
    return validate_project(edited)
