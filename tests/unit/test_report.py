"""The quality and fairness report: a slice made worse on purpose is flagged, and only it."""

from __future__ import annotations

import json
import random
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from services.export.report import (
    MAX_CANDIDATES,
    NONE,
    LabelErrorCandidate,
    LabelErrorCounts,
    build_report,
    wilson,
)
from services.export.report_html import (
    CANDIDATES_SHOWN,
    OTHER_LABEL,
    TOP_LABELS,
    label_series,
    to_dict,
    to_html,
)

LABELS = ("business", "sport", "tech")
TARGET = 0.9


def _row(
    i: int, label: str, metadata: dict[str, Any], *, audit: str | None = None, people: tuple[str, ...] = ()
) -> dict[str, Any]:
    """An item the model labeled `label`; `audit` is an auditor's label, `people` others' labels."""
    raw = []
    if audit is not None:
        raw.append({"annotator_id": "auditor", "label": audit, "reason": "audit", "model_label": label})
    for n, p in enumerate(people):
        raw.append({"annotator_id": f"p{n}", "label": p, "reason": "uncertain", "model_label": label})
    source = "auto" if not people else ("consensus" if len(people) > 1 else "human")
    final = people[0] if people else label
    return {"item_id": str(i), "label": final, "source": source, "metadata": metadata, "raw_labels": raw}


def _rows(seed: int = 7) -> list[dict[str, Any]]:
    """Three regions of 300 items with the same label mix; one audit in every five items. In
    "south" the auditors reject the model's label half the time, elsewhere one time in fifty.
    The channel "email" holds mostly "business"; twenty items have no region at all."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for region in ("north", "south", "west"):
        error = 0.5 if region == "south" else 0.02
        for k in range(300):
            i = len(rows)
            email = k % 3 == 0
            label = "business" if email and rng.random() < 0.85 else LABELS[i % 3]
            meta = {"region": region, "channel": "email" if email else "web"}
            audit = None
            if k % 5 == 0:
                wrong = rng.random() < error
                audit = next(x for x in LABELS if x != label) if wrong else label
            people = (label, label) if k % 7 == 0 else ()
            rows.append(_row(i, label, meta, audit=audit, people=people))
    rows += [_row(len(rows) + n, LABELS[n % 3], {"channel": "web"}) for n in range(20)]
    return rows


def test_wilson_interval() -> None:
    r = wilson(8, 10)
    assert r.estimate == 0.8
    assert r.low == pytest.approx(0.4902, abs=1e-4)
    assert r.high == pytest.approx(0.9433, abs=1e-4)
    empty = wilson(0, 0)
    assert (empty.estimate, empty.low, empty.high) == (None, 0.0, 1.0)


def test_the_worse_slice_is_flagged_and_only_it() -> None:
    report = build_report(_rows(), ["region"], TARGET, "news")
    by_value = {s.value: s for s in report.by_field("region")}
    assert set(by_value) == {"north", "south", "west", NONE}
    assert by_value["south"].accuracy_below_target
    assert by_value["south"].audited_accuracy.high < TARGET
    for value in ("north", "west"):
        assert not by_value[value].accuracy_below_target, value
        assert by_value[value].audited_accuracy.n == 60
    # No audits and no raw labels: nothing is known, so nothing is flagged.
    assert by_value[NONE].items == 20
    assert by_value[NONE].audited_accuracy.n == 0
    assert not by_value[NONE].accuracy_below_target
    assert not any(s.distribution_drift for s in by_value.values())
    assert report.overall.items == 920
    assert report.overall.audited_accuracy.n == 180


def test_agreement_and_shares() -> None:
    report = build_report(_rows(), ["region"], TARGET)
    north = next(s for s in report.slices if s.value == "north")
    # Every seventh item went to two people who agreed with each other and with the model.
    assert north.people_agreement.items == 43
    assert north.people_agreement.share == 1.0
    assert north.human_share == pytest.approx(43 / 300)
    assert north.auto_share == pytest.approx(1 - 43 / 300)
    assert sum(north.labels.values()) == 300
    assert north.model_agreement.n == north.audited_accuracy.n + 2 * 43


def test_without_audits_model_people_agreement_decides() -> None:
    rows = [_row(i, "sport", {"team": "x"}, people=("tech",)) for i in range(30)]
    rows += [_row(100 + i, "sport", {"team": "y"}, people=("sport",)) for i in range(30)]
    report = build_report(rows, ["team"], TARGET)
    flagged = {s.value: s.accuracy_below_target for s in report.slices}
    assert flagged == {"x": True, "y": False}


def test_a_skewed_label_distribution_is_drift() -> None:
    report = build_report(_rows(), ["channel", "region"], TARGET)
    channel = {s.value: s for s in report.by_field("channel")}
    assert channel["email"].distribution_drift
    assert channel["email"].drift_distance > 0.1
    assert channel["email"].drift_p is not None and channel["email"].drift_p < 0.01
    assert not any(s.distribution_drift for s in report.by_field("region"))
    assert report.overall.drift_distance == 0.0


class _Checker(HTMLParser):
    VOID = frozenset({"meta", "br", "hr", "img", "input", "link"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.text: list[str] = []
        self.tags: list[str] = []
        self.comments: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def handle_comment(self, data: str) -> None:
        # matplotlib draws text as glyph paths and leaves the string in a comment beside them.
        self.comments.append(data.strip())


def test_html_is_self_contained_and_well_formed() -> None:
    rows = _rows()
    rows[0]["metadata"]["region"] = "<north & co>"
    page = to_html(build_report(rows, ["region", "channel"], TARGET, "news"))
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert checker.stack == []
    text = "".join(checker.text)
    for name in ("region", "channel", "north", "south", "west", "email", "web", NONE, "<north & co>"):
        assert name in text
    assert "script" not in checker.tags and "<script" not in page.lower()
    # Two charts per slice field, drawn by matplotlib (its SVG says so), inline: no prolog.
    assert checker.tags.count("svg") == 4
    assert page.count("Matplotlib v") == 4
    assert "<?xml" not in page and "<!DOCTYPE svg" not in page
    assert 'class="flagged"' in page
    assert "Label-error review" in text


def test_json_round_trips() -> None:
    doc = json.loads(json.dumps(to_dict(build_report(_rows(), ["region"], TARGET, "news"))))
    south = next(s for s in doc["slices"] if s["value"] == "south")
    assert south["flagged"] and south["accuracy_below_target"]
    assert doc["overall"]["value"] == "(all)"
    assert doc["target_accuracy"] == TARGET


def test_the_command_reads_an_export_file_and_tabulates_the_flags(tmp_path: Path) -> None:
    from rich.console import Console

    from services.cli.__main__ import _parser
    from services.cli.quality import flags_table

    args = _parser().parse_args(["report", "--project", "news", "--slice", "region", "--slice", "channel"])
    assert (args.slice, args.format, args.output) == (["region", "channel"], "html", None)
    # The command gets the report as JSON from the export service: read an export file the same way.
    export = tmp_path / "export.jsonl"
    export.write_text("".join(json.dumps(r) + "\n" for r in _rows()), encoding="utf-8")
    with export.open(encoding="utf-8") as lines:
        report = build_report(
            (json.loads(line) for line in lines),
            args.slice,
            TARGET,
            "news",
            audit_raised={("region", "south"): 1},
        )
    assert report.overall.items == 920
    console = Console(width=200, record=True)
    console.print(flags_table(json.loads(json.dumps(to_dict(report)))))
    out = console.export_text()
    assert "south" in out and "email" in out and "accuracy" in out and "drift" in out
    assert "audits raised" in out


def test_audit_share_counts_an_audited_automatic_item_once() -> None:
    rows = _rows()
    report = build_report(rows, ["region"], TARGET)
    north = next(s for s in report.by_field("region") if s.value == "north")
    # 60 audits (every fifth item); 257 items accepted automatically (all but the 43 sent to two
    # people), 51 of them audited: the base is 257 + the 9 audited items people labeled.
    assert north.audit_share == pytest.approx(60 / 266)
    none = next(s for s in report.by_field("region") if s.value == NONE)
    assert none.audit_share == 0.0  # twenty automatic labels, none audited
    audited = sum(any(r["reason"] == "audit" for r in row["raw_labels"]) for row in rows)
    base = sum(
        any(r["reason"] == "audit" for r in row["raw_labels"]) or row["source"] == "auto" for row in rows
    )
    assert report.overall.audit_share == pytest.approx(audited / base)


def test_audit_share_is_unknown_without_audits_or_automatic_labels() -> None:
    rows = [_row(i, "sport", {"team": "x"}, people=("sport",)) for i in range(5)]
    rows += [_row(10 + i, "sport", {"team": "y"}, audit="sport") for i in range(4)]
    rows += [_row(20 + i, "tech", {"team": "y"}) for i in range(4)]
    report = build_report(rows, ["team"], TARGET)
    shares = {s.value: s.audit_share for s in report.slices}
    assert shares == {"x": None, "y": 0.5}
    assert report.overall.audit_share == 0.5


def _reviewed(
    i: int, given: str, model: str, second: str, final: str, team: str, *, confidence: float = 0.93
) -> dict[str, Any]:
    """An item a person labeled `given`; the model said `model`, so a second person looked."""
    raw = [
        # Listed out of time order on purpose: "the label given" is the earliest by time.
        {
            "annotator_id": "b",
            "label": second,
            "reason": "label_error",
            "labeled_at": "2026-01-02T10:00:00+00:00",
            "model_label": model,
            "model_confidence": confidence,
        },
        {
            "annotator_id": "a",
            "label": given,
            "reason": "uncertain",
            "labeled_at": "2026-01-01T10:00:00+00:00",
            "model_label": "",
            "model_confidence": 0,
        },
    ]
    return {
        "id": f"ext-{i}",
        "item_id": str(i),
        "text": "x" * 300,
        "label": final,
        "source": "consensus",
        "confidence": 1.0,
        "metadata": {"team": team},
        "raw_labels": raw,
    }


def test_label_error_outcomes() -> None:
    rows = [
        _reviewed(1, "sport", "tech", "tech", "tech", "x"),  # the model was right: corrected
        _reviewed(2, "sport", "tech", "sport", "sport", "x"),  # the person was right: kept
        _reviewed(3, "sport", "tech", "business", "business", "y"),  # neither: other
        _reviewed(4, "sport", "tech", "tech", "sport", "y"),  # a third person kept it: kept
        _row(5, "sport", {"team": "y"}, people=("tech",)),  # no review: no candidate
    ]
    report = build_report(rows, ["team"], TARGET)
    assert report.label_errors == LabelErrorCounts(candidates=4, corrected=1, kept=2, other=1)
    by_value = {s.value: s.label_errors for s in report.slices}
    assert by_value == {
        "x": LabelErrorCounts(candidates=2, corrected=1, kept=1, other=0),
        "y": LabelErrorCounts(candidates=2, corrected=0, kept=1, other=1),
    }
    assert report.overall.label_errors == report.label_errors
    first = report.label_error_candidates[0]
    assert first == LabelErrorCandidate(
        id="ext-1",
        item_id="1",
        text="x" * 200,
        given_label="sport",
        model_label="tech",
        model_confidence=0.93,
        second_label="tech",
        final_label="tech",
        outcome="corrected",
    )
    assert [c.outcome for c in report.label_error_candidates] == ["corrected", "kept", "other", "kept"]
    page = to_html(report)
    assert "Label-error review" in page and "ext-3" in page and "x" * 201 not in page
    doc = json.loads(json.dumps(to_dict(report)))
    assert doc["label_errors"] == {"candidates": 4, "corrected": 1, "kept": 2, "other": 1}
    assert doc["label_error_candidates"][0]["outcome"] == "corrected"
    assert doc["slices"][0]["label_errors"]["corrected"] == 1


def test_the_candidate_list_is_capped_but_the_counts_are_exact() -> None:
    n = MAX_CANDIDATES + 20
    rows = [_reviewed(i, "sport", "tech", "tech", "tech", "x") for i in range(n)]
    report = build_report(iter(rows), ["team"], TARGET)
    assert len(report.label_error_candidates) == MAX_CANDIDATES
    assert report.label_errors.candidates == report.label_errors.corrected == n
    page = to_html(report)
    assert page.count('<tr class="corrected">') == CANDIDATES_SHOWN


def test_audit_raised_passes_through_to_json_and_html() -> None:
    since = 1_764_576_000_000  # 2025-12-01 08:00 UTC
    report = build_report(_rows(), ["region"], TARGET, "news", audit_raised={("region", "south"): since})
    raised = {s.value: s.audit_raised_since_unix_ms for s in report.slices}
    assert raised == {"north": 0, "south": since, "west": 0, NONE: 0}
    assert report.overall.audit_raised_since_unix_ms == 0
    doc = to_dict(report)
    assert next(s for s in doc["slices"] if s["value"] == "south")["audit_raised_since_unix_ms"] == since
    assert "audit share raised since 2025-12-01 08:00 UTC" in to_html(report)
    # The old positional call still works, and nothing is raised then.
    plain = build_report(_rows(), ["region"], TARGET, "news")
    assert all(s.audit_raised_since_unix_ms == 0 for s in plain.slices)


def test_the_page_is_the_same_every_time() -> None:
    report = build_report(_rows(), ["region"], TARGET, "news")
    assert to_html(report) == to_html(report)


def test_many_labels_collapse_to_other_in_the_distribution_chart() -> None:
    labels = [f"label{i:03d}" for i in range(150)]
    # label000 is the most frequent, then label001, ...: the top ones are known.
    rows = [
        _row(i, labels[k], {"half": "ab"[i % 2]})
        for i, k in enumerate(k for k in range(150) for _ in range(150 - k))
    ]
    report = build_report(rows, ["half"], TARGET)
    names, shares = label_series(report.by_field("half"), report.overall.labels)
    assert names == [*labels[:TOP_LABELS], OTHER_LABEL]
    for row in shares:
        assert sum(row) == pytest.approx(1.0)
        assert row[-1] > 0.5  # the long tail
    # One label more than the top is drawn as itself, not as "other".
    few = build_report(rows[: sum(150 - k for k in range(TOP_LABELS + 1))], ["half"], TARGET)
    assert label_series(few.slices, few.overall.labels)[0] == labels[: TOP_LABELS + 1]
    checker = _Checker()
    checker.feed(to_html(report))
    assert OTHER_LABEL in checker.comments
    assert "label149" not in checker.comments


def test_an_empty_export_still_makes_a_page() -> None:
    report = build_report([], ["region"], TARGET, "news")
    assert report.overall.items == 0 and report.overall.audit_share is None
    assert report.label_errors == LabelErrorCounts()
    page = to_html(report)
    assert page.count("<svg") == 2


def test_long_values_are_shortened_in_the_charts_only() -> None:
    long = "a region with a very long name indeed, longer than any chart would like"
    rows = [_row(i, LABELS[i % 3], {"region": long}, audit=LABELS[i % 3]) for i in range(10)]
    page = to_html(build_report(rows, ["region"], TARGET))
    assert f"<td>{long}</td>" in page
    assert f"<!-- {long} -->" not in page
