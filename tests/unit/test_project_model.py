from __future__ import annotations

from dataclasses import replace

import numpy as np

from services.common.projects import LabelSpec, ProjectSpec
from services.scorer.policy.centroids import DecisionKind, softmax
from services.scorer.policy.model import LRPolicyConfig, features
from services.scorer.service import ProjectModel, unit_draw


def _unit(m: np.ndarray) -> np.ndarray:
    out: np.ndarray = (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)
    return out


def _world(
    k: int = 3, d: int = 16, n: int = 300, noise: float = 0.35, seed: int = 3
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label embeddings, feature rows (embedding + log zero-shot) and true labels; the same world for
    the same arguments, whichever tests ran before."""
    rng = np.random.default_rng(seed)
    centers = _unit(rng.normal(size=(k, d)))
    y = rng.integers(0, k, size=n)
    emb = _unit(centers[y] + noise * rng.normal(size=(n, d)))
    # A weak labeler: zero-shot over cosine similarity at a soft temperature.
    return centers, features(emb, softmax(emb @ centers.T, 0.5)), y


def _ids(start: int, stop: int) -> list[str]:
    return [f"item-{i}" for i in range(start, stop)]


def _drawn(start: int, stop: int) -> list[str]:
    """Routing reasons of labels drawn at random (the synthetic items come in random order)."""
    return ["sample"] * (stop - start)


PROJECT = ProjectSpec("p", "p", tuple(LabelSpec(c, c) for c in "abc"), "", 0.9, 0.0)
CONFIG = LRPolicyConfig(min_human_labels=20, min_support=10, z=1.0, annotator_error=0.0, confirmations=1)


def test_nothing_is_auto_accepted_before_enough_human_labels() -> None:
    centers, X, y = _world()
    model = ProjectModel(PROJECT, centers, CONFIG)
    model.add_labels(X[:10], y[:10], _ids(0, 10), _drawn(0, 10))
    model.refit()
    assert model.threshold is None
    assert all(d.kind is DecisionKind.REVIEW for d in model.decide(X[10:60], [str(i) for i in range(50)]))


def test_threshold_appears_with_labels_and_auto_accepts_are_accurate() -> None:
    centers, X, y = _world()
    model = ProjectModel(PROJECT, centers, CONFIG)
    model.add_labels(X[:120], y[:120], _ids(0, 120), _drawn(0, 120))
    model.refit()
    assert model.threshold is not None
    # The estimate in force rests on at least min_support labeled items at or above the threshold.
    assert CONFIG.min_support <= model.support <= 120 and 0.0 < model.estimated_accuracy <= 1.0
    decisions = model.decide(X[120:], [str(i) for i in range(len(X) - 120)])
    auto = [i for i, d in enumerate(decisions) if d.kind is DecisionKind.AUTO]
    assert auto, "a separable world must allow some auto-accepts"
    accuracy = np.mean([decisions[i].label == y[120 + i] for i in auto])
    assert accuracy >= 0.9


def test_only_drawn_labels_count_as_random() -> None:
    centers, X, y = _world(noise=0.2)
    model = ProjectModel(PROJECT, centers, CONFIG)
    n_warm = CONFIG.min_human_labels
    # The warm-up is random until the queue is ranked by ambiguity; later "warmup" items were re-ranked.
    reasons = ["warmup"] * (n_warm + 10) + ["uncertain"] * 50 + ["sample", "audit", "control"] * 10
    model.add_labels(X[: len(reasons)], y[: len(reasons)], _ids(0, len(reasons)), reasons)
    expected = [r in ("sample", "audit", "control") for r in reasons]
    expected[:n_warm] = [True] * n_warm
    assert model.random.tolist() == expected
    # A model rebuilt from PostgreSQL gets them all at once, a live one in small batches: same flags.
    live = ProjectModel(PROJECT, centers, CONFIG)
    for start in range(0, len(reasons), 7):
        stop = min(start + 7, len(reasons))
        live.add_labels(X[start:stop], y[start:stop], _ids(start, stop), reasons[start:stop])
    assert live.random.tolist() == expected
    model.refit()
    assert model.threshold is not None
    assert 0 < model.random_support <= model.support and 0.0 < model.random_accuracy <= 1.0


def test_no_threshold_without_random_labels_above_it() -> None:
    centers, X, y = _world(noise=0.2)
    model = ProjectModel(PROJECT, centers, CONFIG)
    model.add_labels(X[:150], y[:150], _ids(0, 150), ["uncertain"] * 150)
    model.refit()
    assert model.threshold is None
    model.add_labels(X[150:200], y[150:200], _ids(150, 200), _drawn(150, 200))
    model.refit()
    assert model.threshold is not None


def test_rescore_accepts_waiting_items_once_the_model_is_sure() -> None:
    centers, X, y = _world(noise=0.2)
    model = ProjectModel(PROJECT, centers, CONFIG)
    waiting, ids = X[200:260], _ids(200, 260)
    before = model.rescore(waiting, ids)
    assert not before.accept and not before.reprioritize  # no threshold yet: leave them alone
    model.add_labels(X[:150], y[:150], _ids(0, 150), _drawn(0, 150))
    model.refit()
    after = model.rescore(waiting, ids)
    assert len(after.accept) + len(after.reprioritize) + len(after.audit) == len(waiting)
    assert len(after.accept) > len(waiting) // 2
    assert all(0.0 <= p <= 1.0 for _, p in after.reprioritize)


def test_a_threshold_is_only_acted_on_once_consecutive_refits_confirm_it() -> None:
    centers, X, y = _world(noise=0.2)
    model = ProjectModel(PROJECT, centers, replace(CONFIG, confirmations=2))
    model.add_labels(X[:120], y[:120], _ids(0, 120), _drawn(0, 120))
    model.refit()
    assert model.threshold is None  # one estimate is not enough
    ids = [str(i) for i in range(120, 300)]
    assert not any(d.kind is DecisionKind.AUTO for d in model.decide(X[120:], ids))
    assert not model.rescore(X[120:], ids).accept
    model.add_labels(X[120:130], y[120:130], _ids(120, 130), _drawn(120, 130))
    model.refit()
    assert model.threshold is not None
    assert any(d.kind is DecisionKind.AUTO for d in model.decide(X[130:], ids[10:]))


def test_review_order_is_random_during_warm_up_then_by_ambiguity() -> None:
    centers, X, y = _world()
    # No threshold can open (support never reached): every item goes to people.
    model = ProjectModel(PROJECT, centers, replace(CONFIG, min_support=10_000, audit_rate=0.0))
    ids = _ids(100, 300)
    warm = model.decide(X[100:], ids)
    assert [d.priority for d in warm] == [unit_draw(i, "sample") for i in ids]
    model.add_labels(X[:20], y[:20], _ids(0, 20), _drawn(0, 20))
    model.refit()
    decisions = model.decide(X[100:], ids)
    top2 = np.sort(model.predict_proba(X[100:]), axis=1)[:, -2:]
    ambiguity = 1.0 - (top2[:, 1] - top2[:, 0])
    assert all(d.kind is DecisionKind.REVIEW for d in decisions)
    assert np.allclose([d.priority for d in decisions], ambiguity, atol=1e-6)


def test_project_settings_override_the_defaults() -> None:
    centers, _, _ = _world()
    custom = ProjectSpec("p", "p", PROJECT.labels, "", 0.99, 0.1)
    model = ProjectModel(custom, centers, CONFIG)
    assert model.config.target_accuracy == 0.99 and model.config.audit_rate == 0.1


def test_unit_draw_is_stable_and_uniform() -> None:
    assert unit_draw("item-1") == unit_draw("item-1")
    draws = np.array([unit_draw(str(i)) for i in range(4000)])
    assert draws.min() >= 0.0 and draws.max() < 1.0
    assert abs(draws.mean() - 0.5) < 0.02


def test_failed_audits_send_every_auto_acceptable_item_to_people() -> None:
    centers, X, y = _world(noise=0.2)
    model = ProjectModel(PROJECT, centers, CONFIG)
    model.add_labels(X[:150], y[:150], _ids(0, 150), _drawn(0, 150))
    model.refit()
    ids = [str(i) for i in range(150, 300)]
    assert any(d.kind is DecisionKind.AUTO for d in model.decide(X[150:], ids))

    model.add_audit_results([True] * 12 + [False] * 13)  # people disagree with half the audited labels
    model.refit()
    assert model.audit_alarm
    decisions = model.decide(X[150:], ids)
    assert not any(d.kind is DecisionKind.AUTO for d in decisions)
    assert any(d.kind is DecisionKind.AUDIT for d in decisions)
    assert not model.rescore(X[150:], ids).accept

    model.add_audit_results([True] * 50)  # fresh audits agree again
    model.refit()
    assert not model.audit_alarm


def test_a_few_audit_misses_do_not_raise_the_alarm() -> None:
    centers, X, y = _world()
    model = ProjectModel(PROJECT, centers, CONFIG)
    model.add_labels(X[:150], y[:150], _ids(0, 150), _drawn(0, 150))
    model.add_audit_results([True] * 45 + [False] * 2)
    model.refit()
    assert not model.audit_alarm


def test_human_budget_by_count_and_share() -> None:
    def with_budget(items: int, share: float) -> ProjectSpec:
        return ProjectSpec("p", "p", PROJECT.labels, "", 0.9, 0.0, items, share)

    assert with_budget(0, 0.0).human_budget(1000) is None
    assert with_budget(50, 0.0).human_budget(1000) == 50
    assert with_budget(0, 0.1).human_budget(1001) == 101
    assert with_budget(50, 0.1).human_budget(300) == 30  # the tighter limit wins

    centers, X, y = _world()
    model = ProjectModel(with_budget(20, 0.0), centers, CONFIG)
    model.seen = 200
    model.add_labels(X[:19], y[:19], _ids(0, 19), _drawn(0, 19))
    assert not model.budget_spent()
    model.add_labels(X[19:20], y[19:20], _ids(19, 20), _drawn(19, 20))
    assert model.budget_spent()
    labels = model.finalize(X[100:110])
    assert len(labels) == 10 and all(0 <= lbl < 3 and 0.0 < conf <= 1.0 for lbl, conf in labels)


def test_control_arm_samples_its_share_at_random() -> None:
    centers, _, _ = _world()
    model = ProjectModel(ProjectSpec("p", "p", PROJECT.labels, "", 0.9, 0.0, 0, 0.0, 0.1), centers, CONFIG)
    share = np.mean([model.is_control(f"item-{i}") for i in range(5000)])
    assert 0.08 < share < 0.12
    assert not ProjectModel(PROJECT, centers, CONFIG).is_control("item-1")


def test_confident_contradictions_of_human_labels_are_sent_for_a_second_opinion() -> None:
    centers, X, y = _world(noise=0.2)
    wrong = y[:120].copy()
    planted = [5, 17, 42, 88]
    for row in planted:
        wrong[row] = (wrong[row] + 1) % 3
    model = ProjectModel(PROJECT, centers, CONFIG)
    model.add_labels(X[:120], wrong, _ids(0, 120), _drawn(0, 120))
    model.refit()
    issues = model.label_issues(limit=10)
    flagged = {item_id for item_id, _ in issues}
    assert {f"item-{r}" for r in planted} <= flagged
    assert len(flagged) <= 6  # clean labels are left alone
    suggested = dict(issues)
    assert all(suggested[f"item-{r}"] == y[r] for r in planted)
    model.second_opinion_asked.update(flagged)
    assert model.label_issues(limit=10) == []  # each label is re-checked once

    model.relabel("item-5", int(y[5]))
    assert model.y[5] == y[5] and model.pending_labels == 1


def test_rescore_holds_back_the_audit_share_of_what_it_would_accept() -> None:
    centers, X, y = _world(noise=0.2)
    model = ProjectModel(PROJECT, centers, replace(CONFIG, audit_rate=0.2, min_support=30))
    waiting, ids = X[150:], _ids(150, 300)
    model.add_labels(X[:20], y[:20], _ids(0, 20), _drawn(0, 20))
    model.refit()
    # Reviews ranked by ambiguity but no threshold yet: a random sample of every item is drawn.
    assert model.ranks_by_ambiguity and model.threshold is None
    early = model.rescore(waiting, ids)
    drawn = {ids[row] for row, *_ in early.audit}
    assert drawn == {i for i in ids if unit_draw(i, "sample") < 0.2}
    assert all(reason == "sample" for *_, reason in early.audit)

    model.add_labels(X[20:150], y[20:150], _ids(20, 150), _drawn(20, 150))
    model.refit()
    assert model.threshold is not None
    later = model.rescore(waiting, ids)
    accepted = {ids[row] for row, _, _ in later.accept}
    audited = {ids[row] for row, *_ in later.audit}
    assert accepted and audited and not accepted & audited
    # Audits are auto-acceptable items the draw picked, labeled as the model would accept them.
    assert all(unit_draw(i) < 0.2 for i in audited) and all(unit_draw(i) >= 0.2 for i in accepted)
    probs = model.predict_proba(waiting)
    for row, label, conf, priority, reason in later.audit:
        assert reason == "audit" and priority == model.config.audit_priority
        assert label == probs[row].argmax() and conf >= model.threshold
