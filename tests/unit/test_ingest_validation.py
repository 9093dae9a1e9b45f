from __future__ import annotations

import dataclasses
import uuid

import pytest

from services.common.projects import LabelSpec, ProjectSpec
from services.gen.tandem.items.v1 import items_pb2
from services.ingest.service import (
    InvalidProject,
    Limits,
    RawItem,
    chunk,
    content_hash,
    edit_project,
    screen,
    validate_project,
)

LIMITS = Limits(max_text_bytes=100, max_metadata_keys=2, max_metadata_value_chars=10)


def raw(text: bytes, project: str = "p", ext: str = "x", **meta: str) -> RawItem:
    return RawItem(external_id=ext, text=text, metadata=dict(meta), synthetic=False, project_id=project)


def test_screen_keeps_good_items_and_explains_each_rejection() -> None:
    items = [
        raw(b"fine text", ext="a"),
        raw(b"\xff\xfe", ext="b"),
        raw(b" \n\t ", ext="c"),
        raw(b"y" * 101, ext="d"),
        raw(b"ok", project="other", ext="e"),
        raw(b"nul\x00inside", ext="f"),
        raw(b"meta", ext="g", k1="v", k2="v", k3="v"),
        raw(b"long meta", ext="h", k="v" * 11),
        raw(b"second fine", ext="i"),
    ]
    out = screen(items, {"p"}, LIMITS)
    assert [v.external_id for v in out.valid] == ["a", "i"]
    assert [v.index for v in out.valid] == [0, 8]
    reasons = {r.external_id: r.reason for r in out.rejected}
    assert reasons["b"] == "text is not valid UTF-8 (byte 0xff at offset 0)"
    assert reasons["c"] == "text is empty"
    assert reasons["d"] == "text is 101 bytes; the limit is 100"
    assert reasons["e"] == "unknown project 'other'"
    assert reasons["f"] == "text contains a NUL character"
    assert reasons["g"] == "metadata has 3 keys; the limit is 2"
    assert "longer than 10" in reasons["h"]


def test_rejections_keep_the_raw_bytes() -> None:
    out = screen([raw(b"\xc3(")], {"p"}, LIMITS)
    assert out.rejected[0].raw == b"\xc3("


def test_content_hash_ignores_unicode_form_and_whitespace() -> None:
    assert content_hash("caf\u00e9  au\nlait ") == content_hash("cafe\u0301 au lait")
    assert content_hash("a b") != content_hash("ab")


def test_chunk_bounds_count_and_bytes() -> None:
    items = screen([raw(b"z" * 50, ext=str(i)) for i in range(10)], {"p"}, LIMITS).valid
    by_count = list(chunk(items, max_items=4, max_bytes=10**6))
    assert [len(c) for c in by_count] == [4, 4, 2]
    by_bytes = list(chunk(items, max_items=100, max_bytes=600))
    assert all(len(c) == 2 for c in by_bytes)
    assert sum(len(c) for c in by_bytes) == 10


def test_batches_stay_under_the_byte_bound_as_serialized_metadata_included() -> None:
    """Metadata counts: items with little text and much metadata once made 1 MB+ messages."""
    limits = Limits(max_text_bytes=1000, max_metadata_keys=20, max_metadata_value_chars=500)
    many = [raw(b"t", ext=f"ext-{i}", **{f"field{k}": "v" * 500 for k in range(20)}) for i in range(200)]
    items = screen(many, {"p"}, limits).valid
    assert len(items) == 200
    bound = 64 * 1024
    batches = list(chunk(items, max_items=1000, max_bytes=bound))
    assert len(batches) > 1 and sum(len(b) for b in batches) == 200
    for batch in batches:
        message = items_pb2.ItemBatch(
            batch_id=str(uuid.uuid4()),
            project_id="p",
            items=[
                items_pb2.Item(
                    item_id=str(uuid.uuid4()),
                    project_id=it.project_id,
                    external_id=it.external_id,
                    text=it.text,
                    metadata=it.metadata,
                    content_hash=it.content_hash,
                    synthetic=it.synthetic,
                    ingested_unix_ms=1_800_000_000_000,
                )
                for it in batch
            ],
        )
        assert message.ByteSize() <= bound


def test_a_nul_in_metadata_or_external_id_refuses_that_item_only() -> None:
    out = screen(
        [raw(b"a", ext="ok"), raw(b"b", ext="m", k="x\x00y"), raw(b"c", ext="e\x00"), raw(b"d", ext="ok2")],
        {"p"},
        LIMITS,
    )
    assert [v.external_id for v in out.valid] == ["ok", "ok2"]
    reasons = sorted(r.reason for r in out.rejected)
    assert reasons == ["external_id contains a NUL character", "metadata 'k' contains a NUL character"]


def spec(**kw: object) -> ProjectSpec:
    base: dict[str, object] = {
        "project_id": "news",
        "name": "",
        "labels": (LabelSpec("a", "A"), LabelSpec("b", "B")),
        "instructions": "",
        "target_accuracy": 0.0,
        "audit_rate": 0.0,
    }
    base.update(kw)
    return ProjectSpec(**base)  # type: ignore[arg-type]


def test_project_defaults_are_filled() -> None:
    p = validate_project(spec())
    # No audit rate: the scorer sizes the audits to the pool (proposals.audit_floor).
    assert p.target_accuracy == 0.95 and p.audit_rate == 0.0 and p.name == "news"
    assert validate_project(spec(audit_rate=0.2)).audit_rate == 0.2


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"project_id": "Bad Id"}, "project_id"),
        ({"labels": (LabelSpec("a", ""),)}, "at least two"),
        ({"labels": (LabelSpec("a", ""), LabelSpec("a", ""))}, "unique"),
        ({"target_accuracy": 1.0}, "target_accuracy"),
        ({"audit_rate": 0.9}, "audit_rate"),
    ],
)
def test_invalid_projects_are_refused(kw: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidProject, match=message):
        validate_project(spec(**kw))


def test_a_dataset_target_above_what_people_reach_needs_blind_labeling() -> None:
    """People at 2% cannot make a 0.99 dataset alone; blind, each disagreement with the model gets
    a second person, and the certificate may reach it."""
    with pytest.raises(InvalidProject, match="unless they label blind"):
        validate_project(spec(target_accuracy=0.99, human_error=0.02))
    blind = validate_project(spec(target_accuracy=0.99, human_error=0.02, hide_suggestions=True))
    assert blind.target_accuracy == 0.99 and blind.hide_suggestions


def _spec(**kw: object) -> ProjectSpec:
    base = ProjectSpec(
        "p", "P", (LabelSpec("a", "first"), LabelSpec("b", "second")), "old", 0.95, 0.0, created_by="mgr"
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_editable_fields_change_and_the_rest_stays() -> None:
    changes = _spec(
        name="New",
        instructions="new",
        labels=(LabelSpec("a", "A!"), LabelSpec("b", "B!")),
        hide_suggestions=True,
        target_accuracy=0.99,
    )
    edited = edit_project(
        _spec(), changes, ["name", "instructions", "label_descriptions", "hide_suggestions"]
    )
    assert (edited.name, edited.instructions, edited.hide_suggestions) == ("New", "new", True)
    assert [lb.description for lb in edited.labels] == ["A!", "B!"]
    assert edited.target_accuracy == 0.95 and edited.created_by == "mgr"


@pytest.mark.parametrize(
    "field", ["target_accuracy", "guarantee", "delta", "human_error", "labels", "project_id"]
)
def test_what_the_certificate_tests_cannot_change(field: str) -> None:
    with pytest.raises(InvalidProject, match="cannot change after creation"):
        edit_project(_spec(), _spec(), [field])


def test_label_descriptions_must_keep_the_labels() -> None:
    renamed = _spec(labels=(LabelSpec("a", "x"), LabelSpec("c", "y")))
    with pytest.raises(InvalidProject, match="same names, same order"):
        edit_project(_spec(), renamed, ["label_descriptions"])
    with pytest.raises(InvalidProject):
        edit_project(_spec(), _spec(human_budget_share=2.0), ["human_budget_share"])
    with pytest.raises(InvalidProject, match="name the fields"):
        edit_project(_spec(), _spec(), [])
