"""services/scorer/policy/model.py, features.py and labels_audit.py: the project's classifier (prior
logistic regression on [embedding, log zero-shot]) and confident learning on its out-of-fold scores."""

from __future__ import annotations

import numpy as np
import pytest

from services.scorer.policy.features import description_features, features
from services.scorer.policy.labels_audit import label_issues
from services.scorer.policy.model import (
    LRClassifier,
    LRPolicyConfig,
    PriorLogisticRegression,
    choose_fit,
    fold_of,
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


def test_features_floor_the_zero_shot_before_the_log() -> None:
    emb = np.array([[0.6, 0.8], [1.0, 0.0]])
    zs = np.array([[1.0, 0.0], [0.25, 0.75]])
    X = features(emb, zs)
    assert X.shape == (2, 4) and X.dtype == np.float64
    np.testing.assert_allclose(X[:, :2], emb)
    # An underflowed probability becomes log(1e-6), not -inf: human labels can still overrule it.
    np.testing.assert_allclose(X[:, 2:], [[0.0, np.log(1e-6)], [np.log(0.25), np.log(0.75)]])
    with pytest.raises(ValueError):
        features(emb, zs[:1])


def test_description_rows_carry_a_smoothed_one_hot_prior() -> None:
    desc = np.eye(3, 5)
    rows = description_features(desc, smoothing=0.4)
    np.testing.assert_allclose(rows[:, :5], desc)
    np.testing.assert_allclose(np.exp(rows[:, 5:]), [[0.6, 0.2, 0.2], [0.2, 0.6, 0.2], [0.2, 0.2, 0.6]])
    # Full smoothing is a flat prior (the diagonal never drops below the rest).
    np.testing.assert_allclose(
        np.exp(description_features(desc, 1.0)[:, 5:]), 0.5 * (1 - np.eye(3)) + 0.5 * np.eye(3)
    )


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
    # Without the description rows class 2 is never predicted.
    bare = LRClassifier(desc, LRPolicyConfig(min_lr_labels=0, desc_weight=0.0))
    bare.fit(features(emb[seen], flat[seen]), y[seen])
    assert (bare.predict_proba(features(emb[~seen], flat[~seen])).argmax(axis=1) == 2).mean() < 0.2


def test_without_labels_the_regression_reproduces_the_labeler() -> None:
    emb, _, desc = _clusters(k=4, per_class=10)
    zs = _zero_shot(emb, desc)
    lr = PriorLogisticRegression(desc, LRPolicyConfig())
    np.testing.assert_allclose(lr.predict_proba(features(emb, zs)), zs, atol=1e-5)


def test_fit_rejects_bad_labels() -> None:
    emb, y, desc = _clusters(k=3, per_class=4)
    X = features(emb, _zero_shot(emb, desc))
    lr = PriorLogisticRegression(desc, LRPolicyConfig())
    with pytest.raises(ValueError):
        lr.fit(X, y[:-1])
    with pytest.raises(ValueError):
        lr.fit(X, np.full(y.size, 3))


def test_folds_follow_arrival_order() -> None:
    assert fold_of(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    # Appending rows never moves an earlier row to another fold.
    assert fold_of(12, 5)[:7].tolist() == fold_of(7, 5).tolist()


def test_oof_rows_are_scored_by_a_model_that_did_not_see_them() -> None:
    # Pure-noise labels: a fitted model memorizes them, an honest out-of-fold score stays near chance.
    rng = np.random.default_rng(1)
    k, n, d = 4, 120, 128
    desc = _unit(rng.normal(size=(k, d)))
    emb = _unit(rng.normal(size=(n, d)))
    y = rng.integers(0, k, size=n)
    X = features(emb, np.full((n, k), 1.0 / k))
    cfg = LRPolicyConfig(min_lr_labels=0, l2=1e-4, l2_grid=(), desc_weight=0.0)
    clf = LRClassifier(desc, cfg)
    clf.fit(X, y)
    in_sample = (clf.predict_proba(X).argmax(axis=1) == y).mean()
    oof = clf.oof_proba()
    assert in_sample > 0.9
    assert (oof.argmax(axis=1) == y).mean() < 0.45
    assert clf.oof_proba() is oof  # cached until the next fit

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


def test_the_regression_takes_over_at_min_lr_labels() -> None:
    emb, y, desc = _clusters(k=3, per_class=10)
    X = features(emb, _zero_shot(emb, desc))
    clf = LRClassifier(desc, LRPolicyConfig(min_lr_labels=20))
    clf.fit(X[:19], y[:19])
    assert not clf.uses_lr and clf.n_fitted == 19
    clf.fit(X[:20], y[:20])
    assert clf.uses_lr and clf.n_fitted == 20


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


def test_label_issues_rank_the_most_confident_contradictions_first() -> None:
    oof = np.array(
        [
            [0.9, 0.1],
            [0.8, 0.2],
            [0.1, 0.9],
            [0.97, 0.03],
            [0.2, 0.8],
            [0.88, 0.12],
            [0.99, 0.01],
            [0.84, 0.16],
        ]
    )
    y = np.array([0, 0, 1, 1, 1, 1, 1, 1])
    # Rows 3, 5, 6 and 7 are labeled 1 but look like class 0. Class 0's threshold is 0.85 (the
    # mean over rows labeled 0): 6, 3 and 5 clear it, 7 does not; min_confidence 0.95 drops 5.
    assert label_issues(oof, y, 0.5).tolist() == [6, 3, 5]
    assert label_issues(oof, y, 0.95).tolist() == [6, 3]
    assert label_issues(np.zeros((0, 2)), np.zeros(0), 0.5).size == 0


def _flat_prior_rows(emb: np.ndarray, k: int) -> np.ndarray:
    return features(emb, np.full((emb.shape[0], k), 1.0 / k))


def test_the_choice_takes_a_weak_penalty_where_labels_are_plentiful_and_clean() -> None:
    emb, y, desc = _clusters(k=4, per_class=150, d=16, noise=0.5, seed=3)
    cfg = LRPolicyConfig(l2_grid=(0.001, 0.01, 0.1, 1.0, 10.0))
    chosen = choose_fit(desc, cfg, _flat_prior_rows(emb, 4), y, np.ones(y.size)).l2
    assert chosen in cfg.l2_grid
    assert chosen <= 0.1
    # Capped: the choice is made on evenly spaced rows in arrival order.
    capped = LRPolicyConfig(l2_grid=cfg.l2_grid, l2_select_max_rows=300)
    rows = np.unique(np.linspace(0, y.size - 1, 300).astype(np.int64))
    X = _flat_prior_rows(emb, 4)
    on_subset = choose_fit(desc, cfg, X[rows], y[rows], np.ones(rows.size))
    assert choose_fit(desc, capped, X, y, np.ones(y.size)) == on_subset


def test_the_choice_takes_the_strongest_penalty_where_labels_are_noise() -> None:
    # Labels unrelated to the embedding: any weight learned is overfitting, so the out-of-fold
    # log-loss is lowest with the embedding weights held near zero.
    rng = np.random.default_rng(4)
    emb = _unit(rng.normal(size=(120, 32)))
    y = rng.integers(0, 3, size=120)
    desc = _unit(rng.normal(size=(3, 32)))
    cfg = LRPolicyConfig(l2_grid=(0.001, 0.01, 0.1, 1.0, 10.0))
    assert choose_fit(desc, cfg, _flat_prior_rows(emb, 3), y, np.ones(y.size)).l2 == 10.0


def test_the_classifier_chooses_its_penalty_again_as_labels_grow() -> None:
    emb, y, desc = _clusters(k=3, per_class=60, d=8, seed=5)
    X = _flat_prior_rows(emb, 3)
    cfg = LRPolicyConfig(min_lr_labels=10, l2_grid=(0.01, 0.1, 1.0), l2_reselect_growth=2.0)
    clf = LRClassifier(desc, cfg)
    clf.fit(X[:20], y[:20])
    assert clf.l2_chosen_at == 20 and clf.l2 in cfg.l2_grid
    clf.fit(X[:39], y[:39])
    assert clf.l2_chosen_at == 20  # not yet twice as many labels
    clf.fit(X[:40], y[:40])
    assert clf.l2_chosen_at == 40
    fixed = LRClassifier(desc, LRPolicyConfig(min_lr_labels=10, l2_grid=(), l2=0.05))
    fixed.fit(X[:40], y[:40])
    assert fixed.l2 == 0.05 and fixed.l2_chosen_at == 0


def test_out_of_fold_predictions_are_made_again_only_as_labels_grow() -> None:
    emb, y, desc = _clusters(k=3, per_class=60, d=8, seed=3)
    X = _flat_prior_rows(emb, 3)
    cfg = LRPolicyConfig(min_lr_labels=10, l2_grid=(), oof_refresh_growth=1.5)
    clf = LRClassifier(desc, cfg)
    clf.fit(X[:40], y[:40])
    assert clf.oof_due()
    clf.refresh_oof()
    first = clf.oof_proba()
    assert clf.oof_labels == 40 and first.shape == (40, 3)
    # A refit on more labels keeps the last predictions (they cover the first 40 rows) ...
    clf.fit(X[:59], y[:59])
    assert not clf.oof_due() and clf.oof_proba() is first
    # ... until the labels have grown by half.
    clf.fit(X[:60], y[:60])
    assert clf.oof_due()
    clf.refresh_oof()
    assert clf.oof_labels == 60 and clf.oof_proba().shape == (60, 3)
    assert not clf.oof_due()
