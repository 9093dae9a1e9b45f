from __future__ import annotations

import numpy as np
import pytest

from services.scorer.policy.centroids import choose_threshold, label_issues
from services.scorer.policy.model import (
    HumanBudget,
    LRClassifier,
    LRPolicyConfig,
    PriorLogisticRegression,
    calibrate,
    choose_threshold_weighted,
    features,
    finalize_remaining,
    fold_of,
    route,
    threshold_in_force,
)


def _unit(m: np.ndarray) -> np.ndarray:
    out: np.ndarray = m / np.linalg.norm(m, axis=1, keepdims=True)
    return out


def _zero_shot(emb: np.ndarray, desc: np.ndarray, temperature: float = 0.05) -> np.ndarray:
    z = emb @ desc.T / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def _clusters(
    k: int, per_class: int, d: int = 16, noise: float = 0.35, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings, labels, description embeddings): unit-norm points around k random class centres."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(k, d)))
    y = np.repeat(np.arange(k), per_class)
    emb = _unit(centres[y] + noise * rng.normal(size=(y.size, d)))
    return emb, y, centres


def test_description_rows_let_the_model_predict_a_class_nobody_labeled() -> None:
    emb, y, desc = _clusters(k=3, per_class=30, noise=0.2)
    # Zero-shot carries no information here (uniform): only the description row can reveal class 2.
    flat = np.full((y.size, 3), 1.0 / 3.0)
    seen = y != 2
    clf = LRClassifier(desc, LRPolicyConfig(min_lr_labels=0, desc_weight=5.0))
    clf.fit(features(emb[seen], flat[seen]), y[seen])
    assert clf.uses_lr
    pred = clf.predict_proba(features(emb[~seen], flat[~seen])).argmax(axis=1)
    assert (pred == 2).mean() > 0.8


def test_without_labels_the_regression_reproduces_the_labeler() -> None:
    emb, _, desc = _clusters(k=4, per_class=10)
    zs = _zero_shot(emb, desc)
    lr = PriorLogisticRegression(desc, LRPolicyConfig())
    np.testing.assert_allclose(lr.predict_proba(features(emb, zs)), zs, atol=1e-5)


def test_oof_rows_are_scored_by_a_model_that_did_not_see_them() -> None:
    # Pure-noise labels: a fitted model memorizes them, an honest out-of-fold score stays near chance.
    rng = np.random.default_rng(1)
    k, n, d = 4, 120, 128
    desc = _unit(rng.normal(size=(k, d)))
    emb = _unit(rng.normal(size=(n, d)))
    y = rng.integers(0, k, size=n)
    X = features(emb, np.full((n, k), 1.0 / k))
    cfg = LRPolicyConfig(min_lr_labels=0, l2=1e-4, desc_weight=0.0)
    clf = LRClassifier(desc, cfg)
    clf.fit(X, y)
    in_sample = (clf.predict_proba(X).argmax(axis=1) == y).mean()
    oof = clf.oof_proba()
    assert in_sample > 0.9
    assert (oof.argmax(axis=1) == y).mean() < 0.45

    # And each fold's rows match a model fitted, from scratch, on the other folds only.
    fold = fold_of(n, cfg.folds)
    for f in range(cfg.folds):
        ref = PriorLogisticRegression(desc, cfg)
        ref.fit(X[fold != f], y[fold != f])
        np.testing.assert_allclose(oof[fold == f], ref.predict_proba(X[fold == f]), atol=2e-2)


def test_centroid_phase_uses_exact_leave_one_out() -> None:
    emb, y, desc = _clusters(k=3, per_class=5)
    X = features(emb, _zero_shot(emb, desc))
    clf = LRClassifier(desc, LRPolicyConfig(min_lr_labels=100))
    clf.fit(X, y)
    assert not clf.uses_lr
    oof = clf.oof_proba()
    for i in (0, 7, 14):
        rest = np.arange(y.size) != i
        ref = LRClassifier(desc, LRPolicyConfig(min_lr_labels=100))
        ref.fit(X[rest], y[rest])
        np.testing.assert_allclose(oof[i], ref.predict_proba(X[i : i + 1])[0], atol=1e-5)


def test_threshold_needs_the_lower_bound_not_the_point_estimate() -> None:
    conf = np.linspace(1.0, 0.5, 200)
    # 29 of 30 right: a 96.7% point estimate, but its 90% lower bound is below 0.95.
    correct = np.ones(200, dtype=bool)
    correct[5] = False
    correct[100:] = False
    assert choose_threshold_weighted(conf[:30], correct[:30], None, 0.95, 1.28, 30) is None
    t = choose_threshold_weighted(conf, correct, None, 0.95, 1.28, 30)
    assert t is not None
    above = conf >= t
    # It admits the reliable block, stops soon after the errors start, and the bound holds where it stops.
    assert above[:100].all() and above.sum() < 105
    assert correct[above].mean() >= 0.95
    # Too little support: nothing qualifies.
    assert choose_threshold_weighted(conf, correct, None, 0.95, 1.28, 500) is None


def test_random_labels_above_the_threshold_can_veto_it() -> None:
    conf = np.linspace(1.0, 0.5, 400)
    correct = np.ones(400, dtype=bool)
    correct[300:] = False
    # Every fifth label was drawn at random; the rest were picked for their ambiguity.
    random = np.arange(400) % 5 == 0
    free = choose_threshold_weighted(conf, correct, None, 0.95, 1.28, 30)
    assert free is not None
    assert choose_threshold_weighted(conf, correct, None, 0.95, 1.28, 30, random, 10) == free
    # Four of the 60 random labels above the errors are wrong (every label picked for ambiguity is right):
    # the bound on all 300 passes, the random ones' 56 of 60 (93%) refute every threshold.
    wrong_random = correct.copy()
    wrong_random[[0, 5, 10, 15]] = False
    t = choose_threshold_weighted(conf, wrong_random, None, 0.95, 1.28, 30)
    assert t is not None and t <= conf[250]
    assert choose_threshold_weighted(conf, wrong_random, None, 0.95, 1.28, 30, random, 10) is None
    # Two wrong: 58 of 60 meets the target over the whole block, not near the top (8 of 10).
    two_wrong = correct.copy()
    two_wrong[[0, 5]] = False
    t2 = choose_threshold_weighted(conf, two_wrong, None, 0.95, 1.28, 30, random, 10)
    assert t2 is not None and t2 <= conf[250]
    # Too few random labels above any threshold: none stands.
    assert choose_threshold_weighted(conf, correct, None, 0.95, 1.28, 30, np.arange(400) < 5, 10) is None


def test_unit_weights_match_the_unweighted_rule() -> None:
    rng = np.random.default_rng(3)
    conf = rng.random(300)
    correct = rng.random(300) < 0.5 + 0.5 * conf
    for target in (0.8, 0.9, 0.95):
        assert choose_threshold_weighted(conf, correct, np.ones(300), target, 1.28, 30) == choose_threshold(
            conf, correct, target, 1.28, 30
        )


def test_a_few_heavily_weighted_items_are_not_a_large_sample() -> None:
    conf = np.linspace(1.0, 0.5, 100)
    correct = np.ones(100, dtype=bool)
    assert choose_threshold_weighted(conf, correct, None, 0.95, 1.28, 30) is not None
    # Two items carry nearly all the weight: effective sample size ~2, below min_support.
    weights = np.full(100, 1e-3)
    weights[:2] = 1.0
    assert choose_threshold_weighted(conf, correct, weights, 0.95, 1.28, 30) is None


def test_calibrate_opens_the_gate_on_separable_data_only_with_enough_labels() -> None:
    emb, y, desc = _clusters(k=3, per_class=40, noise=0.1)
    X = features(emb, _zero_shot(emb, desc))
    cfg = LRPolicyConfig(min_human_labels=40, min_lr_labels=20)
    assert calibrate(LRClassifier(desc, cfg), X[::4], y[::4], cfg) is None  # 30 labels
    assert calibrate(LRClassifier(desc, cfg), X, y, cfg) is not None


def test_label_issues_on_out_of_fold_regression_find_planted_flips() -> None:
    emb, y, desc = _clusters(k=4, per_class=50, noise=0.1, seed=5)
    rng = np.random.default_rng(5)
    flipped = rng.choice(y.size, size=8, replace=False)
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, 4, size=8)) % 4
    clf = LRClassifier(desc, LRPolicyConfig(min_lr_labels=0))
    clf.fit(features(emb, _zero_shot(emb, desc)), noisy)
    found = label_issues(clf.oof_proba(), noisy, min_confidence=0.8)
    assert set(flipped.tolist()) <= set(found.tolist())
    assert found.size <= 10
    # In-sample probabilities would have absorbed the flips; the check relies on out-of-fold ones.
    assert label_issues(np.eye(4)[noisy], noisy, min_confidence=0.7).size == 0


def test_budget_limit_and_finalization_flags_below_target() -> None:
    assert HumanBudget(share=0.1).limit(1000) == 100
    assert HumanBudget(share=0.1, count=40).limit(1000) == 40
    assert HumanBudget(count=5000).limit(1000) == 1000
    assert HumanBudget(count=10).exhausted(10, 1000)
    assert not HumanBudget(count=10).exhausted(9, 1000)
    probs = np.array([[0.97, 0.03], [0.4, 0.6], [0.5, 0.5]])
    fin = finalize_remaining(probs, threshold=0.9)
    assert fin.label.tolist() == [0, 1, 0]
    assert fin.below_target.tolist() == [False, True, True]
    # No threshold yet: nothing the model says is known to meet the target.
    assert finalize_remaining(probs, None).below_target.all()


def test_route_warm_up_is_random_then_ambiguous_first() -> None:
    probs = np.array([[0.99, 0.01], [0.55, 0.45], [0.7, 0.3], [0.55, 0.45]])
    draws = np.array([0.9, 0.1, 0.5, 0.3])
    cfg = LRPolicyConfig(min_human_labels=10, audit_rate=0.0)
    warm = route(probs, None, draws, n_labels=0, config=cfg)
    assert (warm.kind == 1).all() and warm.priority.tolist() == draws.tolist()
    later = route(probs, 0.95, draws, n_labels=50, config=cfg)
    assert later.kind.tolist() == [0, 1, 1, 1]
    review = np.flatnonzero(later.kind == 1)
    ranked = review[np.argsort(-later.priority[review], kind="stable")]
    # Rows 1 and 3 tie on margin: the draw decides, the same way on every call.
    assert ranked.tolist() == [3, 1, 2]


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_route_audits_only_auto_acceptable_items(rate: float) -> None:
    probs = np.array([[0.99, 0.01], [0.6, 0.4]])
    r = route(probs, 0.9, np.array([0.5, 0.5]), n_labels=50, config=LRPolicyConfig(audit_rate=rate))
    assert r.kind.tolist() == ([0, 1] if rate == 0.0 else [2, 1])


def test_threshold_in_force_needs_consecutive_estimates_and_takes_the_strictest() -> None:
    assert threshold_in_force([], 2) is None
    assert threshold_in_force([0.8], 2) is None
    assert threshold_in_force([None, 0.8], 2) is None
    assert threshold_in_force([0.9, 0.8], 2) == 0.9
    assert threshold_in_force([0.7, 0.9, 0.8], 2) == 0.9
    assert threshold_in_force([0.9, 0.8, None], 2) is None  # a lost estimate closes the gate again
    assert threshold_in_force([0.8], 1) == 0.8
    with pytest.raises(ValueError):
        threshold_in_force([0.8], 0)
