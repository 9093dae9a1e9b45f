"""Access rules: every gRPC method has one, and each role may do what the README says."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import services.gen.tandem as gen
from services.common.auth import RULES, Action, Principal, Role, _bearer


def _all_methods() -> list[tuple[str, object]]:
    methods = []
    for module in pkgutil.walk_packages(gen.__path__, gen.__name__ + "."):
        if not module.name.endswith("_pb2"):
            continue
        descriptor = importlib.import_module(module.name).DESCRIPTOR
        for service in descriptor.services_by_name.values():
            for method in service.methods:
                methods.append((f"/{service.full_name}/{method.name}", method.input_type))
    return methods


def test_every_grpc_method_has_an_access_rule() -> None:
    methods = _all_methods()
    assert len(methods) >= 20
    missing = [name for name, _ in methods if name not in RULES]
    assert missing == []


def test_project_fields_named_by_rules_exist_on_the_requests() -> None:
    inputs = dict(_all_methods())
    for name, rule in RULES.items():
        if rule.project_field is not None:
            assert rule.project_field in inputs[name].fields_by_name, name  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("role", "allowed", "denied"),
    [
        (Role.ANNOTATOR, {Action.LABEL, Action.READ}, {Action.EXPORT, Action.CREATE_PROJECT, Action.INGEST}),
        (Role.VIEWER, {Action.READ}, {Action.LABEL, Action.EXPORT}),
        (Role.MANAGER, {Action.CREATE_PROJECT, Action.EXPORT, Action.MANAGE_MEMBERS}, {Action.MANAGE_USERS}),
        (Role.ADMIN, set(Action), set()),
    ],
)
def test_roles(role: Role, allowed: set[Action], denied: set[Action]) -> None:
    p = Principal("u", role, frozenset({"p1"}))
    assert all(p.may(a) for a in allowed)
    assert not any(p.may(a) for a in denied)


def test_membership_scopes_everyone_but_admins() -> None:
    assert Principal("u", Role.MANAGER, frozenset({"p1"})).member_of("p1")
    assert not Principal("u", Role.MANAGER, frozenset({"p1"})).member_of("p2")
    assert Principal("a", Role.ADMIN, frozenset()).member_of("p2")


def test_bearer_parsing() -> None:
    assert _bearer([("authorization", "Bearer abc")]) == "abc"
    assert _bearer([("authorization", "bearer  abc ")]) == "abc"
    assert _bearer([("authorization", "Basic abc")]) is None
    assert _bearer([("x", "Bearer abc")]) is None
