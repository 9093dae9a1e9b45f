"""services/scorer/policy/routing.py (people's order) and budget.py (the human budget)."""

from __future__ import annotations

import numpy as np
import pytest

from services.scorer.policy.budget import HumanBudget
from services.scorer.policy.routing import confidence_of, margin, route


def test_margin_and_confidence() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.45, 0.15], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(margin(probs), [0.5, 0.05, 0.0], atol=1e-12)
    np.testing.assert_allclose(confidence_of(probs), [0.7, 0.45, 1 / 3])
    assert margin(np.ones((2, 1))).tolist() == [1.0, 1.0]  # a single class is never ambiguous


def test_route_warm_up_is_random_then_ambiguous_first() -> None:
    probs = np.array([[0.99, 0.01], [0.55, 0.45], [0.7, 0.3], [0.55, 0.45]])
    draws = np.array([0.9, 0.1, 0.5, 0.3])
    warm = route(probs, draws, n_labels=9, warmup_labels=10)
    assert warm.warmup and warm.priority.tolist() == draws.tolist()
    assert warm.label.tolist() == [0, 0, 0, 0]
    np.testing.assert_allclose(warm.confidence, [0.99, 0.55, 0.7, 0.55])

    later = route(probs, draws, n_labels=10, warmup_labels=10)
    assert not later.warmup
    ranked = np.argsort(-later.priority, kind="stable")
    # Rows 1 and 3 tie on margin: the draw decides, the same way on every call.
    assert ranked.tolist() == [3, 1, 2, 0]
    np.testing.assert_allclose(later.priority, 1.0 - margin(probs), atol=1e-8)


def test_route_needs_one_draw_per_row() -> None:
    with pytest.raises(ValueError):
        route(np.full((2, 2), 0.5), np.array([0.1]), n_labels=0, warmup_labels=1)


def test_budget_limits_and_floor_rounding() -> None:
    assert not HumanBudget().limited and HumanBudget().limit(1000) is None
    assert not HumanBudget().spent(10**6, 1000)
    assert HumanBudget(share=0.1).limit(1000) == 100
    # A share never rounds up: 3% of 1,001 items is 30 labels, 10% of 1,009 is 100.
    assert HumanBudget(share=0.03).limit(1001) == 30
    assert HumanBudget(share=0.1).limit(1009) == 100
    assert HumanBudget(share=0.29).limit(100) == 29  # 0.29 * 100 is 28.999999999999996 in floats
    assert HumanBudget(share=0.1, count=40).limit(1000) == 40  # the tighter cap wins
    assert HumanBudget(share=0.1, count=500).limit(1000) == 100
    assert HumanBudget(count=5000).limit(1000) == 5000
    budget = HumanBudget(count=10)
    assert budget.limited and budget.spent(10, 1000) and not budget.spent(9, 1000)
    # A share grows with the items seen.
    assert HumanBudget(share=0.5).spent(5, 10) and not HumanBudget(share=0.5).spent(5, 12)
