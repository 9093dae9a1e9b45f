"""services/scorer/policy/centroids.py: the class-centroid model of a project's first labels."""

from __future__ import annotations

import numpy as np
import pytest

from services.scorer.policy.centroids import CentroidClassifier, PolicyConfig, softmax


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
    assert oof.shape == (n, k) and clf.n_fitted == n

    for i in range(n):
        keep = np.arange(n) != i
        naive = CentroidClassifier(desc, config)
        naive.fit(X[keep], y[keep])
        expected = naive.predict_proba(X[i : i + 1])[0]
        if prior_weight == 0.0 and y[i] == 2:
            # The empty class has a zero centroid; cosine 0 is the defined value.
            cos = naive.cosine(X[i : i + 1])[0]
            cos[2] = 0.0
            expected = softmax(cos[None, :], config.temperature)[0].astype(np.float32)
        np.testing.assert_allclose(oof[i], expected, rtol=1e-5, atol=1e-6)


def test_oof_proba_of_an_unfitted_model_is_empty() -> None:
    clf = CentroidClassifier(np.eye(3, 4), PolicyConfig())
    assert clf.oof_proba().shape == (0, 3)


def test_fit_and_predict_proba_are_normalized_and_follow_centroids() -> None:
    desc = np.eye(3, 4)
    clf = CentroidClassifier(desc, PolicyConfig(prior_weight=1.0, temperature=0.05))
    probs = clf.predict_proba(np.eye(3, 4))
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    assert list(probs.argmax(axis=1)) == [0, 1, 2]
    # Before any label, a point along axis 3 is equally far from every description.
    np.testing.assert_allclose(clf.predict_proba(np.array([[0.0, 0.0, 0.0, 1.0]]))[0], 1 / 3, atol=1e-6)
    # Many labeled examples of class 0 pointing along axis 3 drag its centroid there.
    X = np.tile(np.array([[0.0, 0.0, 0.0, 1.0]]), (20, 1))
    clf.fit(X, np.zeros(20, dtype=np.int64))
    assert clf.predict_proba(np.array([[0.0, 0.0, 0.0, 1.0]])).argmax() == 0


def test_fit_rejects_bad_labels() -> None:
    clf = CentroidClassifier(np.eye(2), PolicyConfig())
    with pytest.raises(ValueError):
        clf.fit(np.eye(2), np.array([0, 2]))
    with pytest.raises(ValueError):
        clf.fit(np.eye(2), np.array([0]))


def test_softmax_rows_sum_to_one_and_sharpen_with_temperature() -> None:
    scores = np.array([[0.2, 0.1, -0.3], [1000.0, 999.0, 0.0]])  # large scores must not overflow
    soft, sharp = softmax(scores, 1.0), softmax(scores, 0.05)
    np.testing.assert_allclose(soft.sum(axis=1), 1.0)
    np.testing.assert_allclose(sharp.sum(axis=1), 1.0)
    assert np.isfinite(soft).all() and sharp[0, 0] > soft[0, 0]
    assert soft[1, 0] == pytest.approx(1.0 / (1.0 + np.exp(-1.0) + np.exp(-1000.0)))
