"""The Prometheus alert rules load: every expression parses and names only metrics that exist.
The Grafana dashboard's queries are held to the same check.

There is no promtool wheel; promql-parser (Prometheus' grammar, in Rust) stands in for
`promtool check rules`, and the structural checks cover what promtool would reject besides.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "k8s" / "base" / "alerts.yaml"
DASHBOARD = ROOT / "deploy" / "k8s" / "grafana" / "tandem-dashboard.json"
SERVICES = ROOT / "services"
# Series Prometheus itself writes for every target, not exported by the services.
STANDARD = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped", "ALERTS"})
SEVERITIES = frozenset({"info", "warning", "critical"})
# prometheus_client appends these to the name a Counter or Histogram is declared with.
SUFFIXES = ("_total", "_created", "_bucket", "_count", "_sum")


def _rule_file() -> dict[str, Any]:
    doc = yaml.safe_load(ALERTS.read_text())
    assert isinstance(doc, dict)
    return doc


def _rules() -> list[dict[str, Any]]:
    return [rule for group in _rule_file()["spec"]["groups"] for rule in group["rules"]]


def _metric_names(expr: promql_parser.Expr) -> set[str]:
    names: set[str] = set()

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name: {node}"
            names.add(node.name)

    promql_parser.walk(expr, pre_visit=visit)
    return names


@cache
def _exported_source() -> str:
    return "\n".join(path.read_text() for path in SERVICES.rglob("*.py") if "gen" not in path.parts)


def _is_exported(name: str) -> bool:
    source = _exported_source()
    candidates = {name} | {name.removesuffix(s) for s in SUFFIXES if name.endswith(s)}
    return any(re.search(rf"""["']{re.escape(c)}["']""", source) for c in candidates)


def test_rule_file_is_a_prometheus_rule_in_the_base() -> None:
    doc = _rule_file()
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["kind"] == "PrometheusRule"
    kustomization = yaml.safe_load((ALERTS.parent / "kustomization.yaml").read_text())
    assert ALERTS.name in kustomization["resources"]


def test_groups_and_alert_names_are_unique() -> None:
    groups = [g["name"] for g in _rule_file()["spec"]["groups"]]
    assert len(groups) == len(set(groups))
    names = [r["alert"] for r in _rules()]
    assert len(names) == len(set(names)), names


@pytest.mark.parametrize("rule", _rules(), ids=lambda r: str(r.get("alert")))
def test_rule_is_complete(rule: dict[str, Any]) -> None:
    assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, sorted(rule)
    assert re.fullmatch(r"Tandem[A-Z][A-Za-z]+", rule["alert"])
    promql_parser.parse_duration(rule["for"])
    assert rule["labels"]["severity"] in SEVERITIES
    annotations = rule["annotations"]
    assert annotations["summary"].strip()
    # A runbook: what it means and what to do, not a one-liner.
    assert len(annotations["description"].split()) >= 30


@pytest.mark.parametrize("rule", _rules(), ids=lambda r: str(r.get("alert")))
def test_expression_parses_and_uses_real_metrics(rule: dict[str, Any]) -> None:
    expr = promql_parser.parse(rule["expr"])
    names = _metric_names(expr)
    assert names, "an alert on no metric"
    unknown = sorted(n for n in names if n not in STANDARD and not _is_exported(n))
    assert not unknown, f"{rule['alert']} uses metrics no service exports: {unknown}"


def test_metric_check_rejects_made_up_names() -> None:
    assert _is_exported("tandem_bus_dead_letters_total")
    assert _is_exported("tandem_bus_handler_seconds_bucket")
    assert not _is_exported("tandem_bus_nothing_total")
    with pytest.raises(ValueError):
        promql_parser.parse("sum by (consumer) (rate(tandem_bus_messages_total[5m])")


def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


@pytest.mark.parametrize(("title", "query"), _dashboard_queries())
def test_dashboard_query_parses_and_uses_real_metrics(title: str, query: str) -> None:
    # Grafana substitutes its range variable before Prometheus sees the query.
    expr = promql_parser.parse(query.replace("$__rate_interval", "5m"))
    unknown = sorted(n for n in _metric_names(expr) if n not in STANDARD and not _is_exported(n))
    assert not unknown, f"panel {title!r} queries metrics no service exports: {unknown}"


def test_dashboard_shows_what_the_alerts_watch() -> None:
    queries = " ".join(q for _, q in _dashboard_queries())
    for name in (
        "tandem_bus_consumer_pending",
        "tandem_bus_dead_letters_total",
        "ALERTS",
        "tandem_scorer_target_accuracy",
    ):
        assert name in queries
