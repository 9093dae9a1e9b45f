from __future__ import annotations

import math

import numpy as np
import pytest

from services.scorer.policy.centroids import (
    CentroidClassifier,
    DecisionKind,
    PolicyConfig,
    agreement_target,
    calibrate,
    choose_threshold,
    decide,
    margin,
    wilson_lower_bound,
)


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    m = rng.normal(size=(n, d))
    out: np.ndarray = m / np.linalg.norm(m, axis=1, keepdims=True)
    return out


@pytest.mark.parametrize("prior_weight", [0.0, 0.5, 3.0])
def test_oof_proba_matches_refit_without_each_row(prior_weight: float) -> None:
    rng = np.random.default_rng(7)
    k, d, n = 3, 8, 14
    config = PolicyConfig(prior_weight=prior_weight, temperature=0.1)
    desc = _unit_rows(rng, k, d)
    X = _unit_rows(rng, n, d)
    # Class 2 has exactly one example: with no prior its leave-one-out centroid vanishes.
    y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 1, 0, 2])
    clf = CentroidClassifier(desc, config)
    clf.fit(X, y)
    oof = clf.oof_proba()

    for i in range(n):
        keep = np.arange(n) != i
        naive = CentroidClassifier(desc, config)
        naive.fit(X[keep], y[keep])
        expected = naive.predict_proba(X[i : i + 1])[0]
        if prior_weight == 0.0 and y[i] == 2:
            # The empty class has a zero centroid; cosine 0 is the defined value.
            cos = X[i] @ naive._centroids.T
            cos[2] = 0.0
            e = np.exp((cos - cos.max()) / config.temperature)
            expected = (e / e.sum()).astype(np.float32)
        np.testing.assert_allclose(oof[i], expected, rtol=1e-5, atol=1e-6)


def test_fit_and_predict_proba_are_normalized_and_follow_centroids() -> None:
    desc = np.eye(3, 4)
    clf = CentroidClassifier(desc, PolicyConfig(prior_weight=1.0, temperature=0.05))
    probs = clf.predict_proba(np.eye(3, 4))
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    assert list(probs.argmax(axis=1)) == [0, 1, 2]
    # Many labeled examples of class 0 pointing along axis 3 drag its centroid there.
    X = np.tile(np.array([[0.0, 0.0, 0.0, 1.0]]), (20, 1))
    clf.fit(X, np.zeros(20, dtype=np.int64))
    assert clf.predict_proba(np.array([[0.0, 0.0, 0.0, 1.0]])).argmax() == 0


def test_fit_rejects_bad_labels() -> None:
    clf = CentroidClassifier(np.eye(2), PolicyConfig())
    with pytest.raises(ValueError):
        clf.fit(np.eye(2), np.array([0, 2]))


def test_margin() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.45, 0.15], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(margin(probs), [0.5, 0.05, 0.0], atol=1e-12)


def test_wilson_lower_bound() -> None:
    assert wilson_lower_bound(0, 0, 1.645) == 0.0
    # Known value: 95/100 at z=1.96 -> 0.8882.
    assert wilson_lower_bound(95, 100, 1.96) == pytest.approx(0.88825, abs=1e-4)
    assert wilson_lower_bound(100, 100, 1.645) == pytest.approx(1 / (1 + 1.645**2 / 100), abs=1e-9)
    assert wilson_lower_bound(50, 100, 0.0) == pytest.approx(0.5)
    assert wilson_lower_bound(10, 10, 1.645) < wilson_lower_bound(100, 100, 1.645)
    with pytest.raises(ValueError):
        wilson_lower_bound(3, 2, 1.0)


def test_choose_threshold_none_without_support() -> None:
    conf = np.linspace(0.5, 1.0, 20)
    correct = np.ones(20, dtype=bool)
    assert choose_threshold(conf, correct, target=0.9, z=1.0, min_support=21) is None
    assert choose_threshold(np.array([]), np.array([], dtype=bool), 0.9, 1.0, 1) is None


def test_choose_threshold_none_when_accuracy_too_low() -> None:
    conf = np.linspace(0.5, 1.0, 50)
    correct = np.arange(50) % 2 == 0  # 50% everywhere
    assert choose_threshold(conf, correct, target=0.9, z=1.0, min_support=5) is None


def test_choose_threshold_picks_smallest_qualifying() -> None:
    # 100 items: the 60 most confident are all correct, the rest all wrong.
    conf = np.arange(100) / 100.0
    correct = conf >= 0.40
    rng = np.random.default_rng(0)
    perm = rng.permutation(100)
    t = choose_threshold(conf[perm], correct[perm], target=0.9, z=1.0, min_support=10)
    assert t is not None
    # Walk down by hand: with all-correct top group, how far can wrong items be added?
    best = None
    for cand in sorted(conf, reverse=True):
        sel = conf >= cand
        n, s = int(sel.sum()), int(correct[sel].sum())
        if n >= 10 and wilson_lower_bound(s, n, 1.0) >= 0.9:
            best = float(cand)
    assert t == pytest.approx(best)
    assert t <= 0.40  # a few wrong items are tolerated by a 0.9 target...
    assert t > 0.30  # ...but not many


def test_choose_threshold_treats_ties_together() -> None:
    # Ten confident correct items, then a tie at 0.5 of one correct and nine wrong ones.
    conf = np.array([0.9] * 10 + [0.5] * 10)
    correct = np.array([True] * 11 + [False] * 9)
    t = choose_threshold(conf, correct, target=0.6, z=0.0, min_support=5)
    assert t == pytest.approx(0.9)
    assert choose_threshold(conf, correct, target=0.5, z=0.0, min_support=5) == pytest.approx(0.5)


def test_decide_split() -> None:
    config = PolicyConfig(audit_rate=0.1, audit_priority=0.5)
    probs = np.array(
        [
            [0.98, 0.01, 0.01],  # confident -> auto
            [0.97, 0.02, 0.01],  # confident but drawn for audit
            [0.50, 0.45, 0.05],  # ambiguous -> review
            [0.10, 0.20, 0.70],  # below threshold -> review
        ]
    )
    draws = np.array([0.5, 0.05, 0.01, 0.9])
    out = decide(probs, 0.9, draws, config)
    assert [d.kind for d in out] == [
        DecisionKind.AUTO,
        DecisionKind.AUDIT,
        DecisionKind.REVIEW,
        DecisionKind.REVIEW,
    ]
    assert [d.label for d in out] == [0, 0, 0, 2]
    assert out[0].confidence == pytest.approx(0.98)
    assert out[1].priority == pytest.approx(0.5)
    assert out[2].priority == pytest.approx(1 - 0.05)
    assert out[3].priority == pytest.approx(1 - 0.5)
    # The ambiguous item is served before the clearer one.
    assert out[2].priority > out[3].priority


def test_decide_without_threshold_reviews_everything() -> None:
    probs = np.array([[0.99, 0.01], [0.6, 0.4]])
    out = decide(probs, None, np.array([0.3, 0.7]), PolicyConfig(audit_rate=1.0))
    assert all(d.kind is DecisionKind.REVIEW for d in out)
    # Warm-up: served in random order (the draw), not ambiguity-first.
    assert math.isclose(out[0].priority, 0.3) and math.isclose(out[1].priority, 0.7)
    with pytest.raises(ValueError):
        decide(probs, 0.5, np.array([0.0]), PolicyConfig())


def test_agreement_target_accounts_for_annotator_errors() -> None:
    assert agreement_target(0.95, 0.0, 5) == 0.95
    # p(1-e) + (1-p)e/(k-1) with p=0.95, e=0.02, k=5.
    assert agreement_target(0.95, 0.02, 5) == pytest.approx(0.95 * 0.98 + 0.05 * 0.005)
    assert agreement_target(0.95, 0.02, 5) < 0.95


def test_calibrate_waits_for_min_human_labels() -> None:
    rng = np.random.default_rng(3)
    desc = np.eye(2, 6)
    centers = np.eye(2, 6)
    y = rng.integers(0, 2, size=80)
    X = centers[y] + 0.05 * rng.normal(size=(80, 6))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    config = PolicyConfig(min_human_labels=100, min_support=10, target_accuracy=0.9)
    clf = CentroidClassifier(desc, config)
    assert calibrate(clf, X, y, config) is None
    config = PolicyConfig(min_human_labels=50, min_support=10, target_accuracy=0.9)
    t = calibrate(clf, X, y, config)
    assert t is not None and 0.0 < t <= 1.0
