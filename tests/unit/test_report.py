"""The quality and fairness report: a slice made worse on purpose is flagged, and only it."""

from __future__ import annotations

import json
import random
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from services.export.report import NONE, build_report, wilson
from services.export.report_html import to_dict, to_html

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
    assert "script" not in checker.tags
    assert checker.tags.count("svg") == 2
    assert 'class="flagged"' in page


def test_json_round_trips() -> None:
    doc = json.loads(json.dumps(to_dict(build_report(_rows(), ["region"], TARGET, "news"))))
    south = next(s for s in doc["slices"] if s["value"] == "south")
    assert south["flagged"] and south["accuracy_below_target"]
    assert doc["overall"]["value"] == "(all)"
    assert doc["target_accuracy"] == TARGET


def test_the_command_reads_an_export_file_and_tabulates_the_flags(tmp_path: Path) -> None:
    from rich.console import Console

    from services.cli.__main__ import _parser
    from services.cli.quality import _build, flags_table

    args = _parser().parse_args(["report", "--project", "news", "--slice", "region", "--slice", "channel"])
    assert (args.slice, args.format, args.output, args.target) == (["region", "channel"], "html", None, None)
    export = tmp_path / "export.jsonl"
    export.write_text("".join(json.dumps(r) + "\n" for r in _rows()), encoding="utf-8")
    report = _build(export, args.slice, TARGET, "news")
    assert report.overall.items == 920
    console = Console(width=200, record=True)
    console.print(flags_table(report))
    out = console.export_text()
    assert "south" in out and "email" in out and "accuracy" in out and "drift" in out
