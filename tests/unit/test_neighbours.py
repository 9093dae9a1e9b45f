"""services/scorer/policy/neighbours.py and its place in the classifier: the labels of an item's
nearest labeled neighbours as a second view beside the regression."""

from __future__ import annotations

import numpy as np

from services.scorer.policy.features import features
from services.scorer.policy.model import LRClassifier, LRPolicyConfig, choose_fit
from services.scorer.policy.neighbours import blend, neighbour_proba, unit_rows


def test_neighbours_vote_for_their_labels_and_leave_unseen_classes_to_the_model() -> None:
    ref = unit_rows(np.array([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [0.1, 0.9, 0.0]]))
    ref_y = np.array([0, 0, 1, 1])
    query = unit_rows(np.array([[1.0, 0.05, 0.0], [0.05, 1.0, 0.0]]))
    # The model gives class 2 (never labeled) 0.3: the neighbours cannot speak for it, so it keeps 0.3.
    p_model = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]], dtype=np.float32)
    near = neighbour_proba(ref, ref_y, np.ones(4), query, p_model, k=2, temperature=0.05)
    np.testing.assert_allclose(near.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(near[:, 2], 0.3, rtol=1e-6)
    # Each query sits in the other class's corner from what the model says: the neighbours disagree.
    assert near[0, 0] > 0.69 and near[1, 1] > 0.69
    # No labeled rows at all: the model's distribution as it is.
    empty = neighbour_proba(ref[:0], ref_y[:0], np.ones(0), query, p_model, k=2, temperature=0.05)
    np.testing.assert_allclose(empty, p_model)


def test_neighbours_weigh_votes_by_the_labels_weight_and_score_in_bounded_blocks() -> None:
    rng = np.random.default_rng(1)
    ref = unit_rows(rng.normal(size=(300, 8)))
    ref_y = rng.integers(0, 4, size=300)
    query = unit_rows(rng.normal(size=(1300, 8)))  # more than one block of rows
    p_model = np.full((1300, 4), 0.25, dtype=np.float32)
    whole = neighbour_proba(ref, ref_y, np.ones(300), query, p_model, k=7, temperature=0.1)
    one_by_one = np.vstack(
        [
            neighbour_proba(ref, ref_y, np.ones(300), query[i : i + 1], p_model[:1], 7, 0.1)
            for i in range(0, 1300, 97)
        ]
    )
    np.testing.assert_allclose(whole[::97], one_by_one, rtol=1e-5)
    # A label with no weight (an aggregated label nobody trusts) casts no vote.
    silenced = neighbour_proba(ref, ref_y, (ref_y != 3).astype(float), query, p_model, k=7, temperature=0.1)
    assert silenced[:, 3].max() < 0.01 and whole[:, 3].max() > 0.5


def test_blend_mixes_the_views_by_weight() -> None:
    a = np.array([[0.8, 0.2]], dtype=np.float32)
    b = np.array([[0.2, 0.8]], dtype=np.float32)
    np.testing.assert_allclose(blend(a, b, 0.25), [[0.65, 0.35]], rtol=1e-6)
    assert blend(a, b, 0.0) is a


def _pockets(per_pocket: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two classes in four pockets laid out like XOR: no linear boundary separates them, their
    neighbours do. (embeddings, labels, description embeddings)"""
    rng = np.random.default_rng(seed)
    centres = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], dtype=float)
    pocket = np.repeat(np.arange(4), per_pocket)
    y = np.array([0, 1, 1, 0])[pocket]
    emb = np.hstack([centres[pocket] + 0.3 * rng.normal(size=(pocket.size, 2)), np.ones((pocket.size, 1))])
    order = rng.permutation(pocket.size)
    desc = unit_rows(np.array([[0.0, 0.0, 1.0], [0.0, 0.1, 1.0]]))
    return unit_rows(emb[order]), y[order], desc


def test_the_neighbours_view_is_chosen_where_a_linear_boundary_fails() -> None:
    emb, y, desc = _pockets(per_pocket=60, seed=2)
    flat = np.full((y.size, 2), 0.5)
    X = features(emb, flat)
    cfg = LRPolicyConfig(min_lr_labels=10, neighbours_weights=(0.0, 0.25, 0.5, 0.75))
    chosen = choose_fit(desc, cfg, X[:160], y[:160], np.ones(160))
    assert chosen.neighbours_weight > 0
    clf = LRClassifier(desc, cfg)
    clf.fit(X[:160], y[:160])
    alone = LRClassifier(desc, LRPolicyConfig(min_lr_labels=10, neighbours_weights=()))
    alone.fit(X[:160], y[:160])
    rest = slice(160, None)
    blended_acc = (clf.predict_proba(X[rest]).argmax(axis=1) == y[rest]).mean()
    alone_acc = (alone.predict_proba(X[rest]).argmax(axis=1) == y[rest]).mean()
    assert alone.neighbours_weight == 0 and alone_acc < 0.75
    assert blended_acc > 0.9
    # The label-error audit's out-of-fold predictions use both views too (neighbours from the
    # other folds only).
    clf.refresh_oof()
    assert (clf.oof_proba().argmax(axis=1) == y[:160]).mean() > 0.85
