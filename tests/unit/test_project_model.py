"""services/scorer/service.py ProjectModel: the scorer's per-project model (labels in, refit,
people's order, proposals, certificate out). The certificate's coverage and the end-to-end run are
in test_certification.py."""

from __future__ import annotations

import numpy as np
import pytest

from services.common.projects import LabelSpec, ProjectSpec
from services.scorer.policy.centroids import softmax
from services.scorer.policy.certification import Guarantee
from services.scorer.policy.features import features
from services.scorer.policy.model import LRPolicyConfig
from services.scorer.policy.proposals import ACCEPTED, REJECTED, Entry
from services.scorer.policy.routing import margin
from services.scorer.service import FLAGGED_SLICE_AUDIT, ProjectModel, head_of_queue, unit_draw


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


def _spec(**kw: object) -> ProjectSpec:
    base: dict[str, object] = {
        "project_id": "p",
        "name": "p",
        "labels": tuple(LabelSpec(c, c) for c in "abc"),
        "instructions": "",
        "target_accuracy": 0.9,
        "audit_rate": 0.0,
    }
    base.update(kw)
    return ProjectSpec(**base)  # type: ignore[arg-type]


CONFIG = LRPolicyConfig(min_human_labels=20)


def test_nothing_is_proposed_before_enough_human_labels() -> None:
    centers, X, y = _world(noise=0.2)
    model = ProjectModel(_spec(), centers, CONFIG)
    model.seen = 300
    waiting, ids = X[100:], _ids(100, 300)
    for stop in (0, 10, 19):
        model.add_labels(X[len(model.y) : stop], y[len(model.y) : stop], _ids(len(model.y), stop))
        model.refit()
        out = model.rescore(waiting, ids)
        assert not out.proposed and not out.accept and not out.reprioritize and not model.book.entries
    model.add_labels(X[19:100], y[19:100], _ids(19, 100))
    model.refit()
    out = model.rescore(waiting, ids)
    # A separable world: the first proposal comes as soon as the warm-up is over.
    assert out.proposed and out.batch == 1 and model.book.has_pending()
    # Ranked by ambiguity now (priorities were unknown), but for the items just proposed: their
    # priority is their audit's, or they wait for their batch.
    proposed = {e.item_id for e in out.proposed}
    assert len(out.reprioritize) == len(ids) - len(proposed)
    assert not proposed & {ids[row] for row, _ in out.reprioritize}


def test_proposals_are_the_most_confident_items_audited_by_their_own_draw() -> None:
    centers, X, y = _world(noise=0.2)
    model = ProjectModel(_spec(), centers, CONFIG)
    model.seen = 300
    model.add_labels(X[:100], y[:100], _ids(0, 100))
    model.refit()
    waiting, ids = X[100:], _ids(100, 300)
    out = model.rescore(waiting, ids)
    probs = model.predict_proba(waiting)
    row = {item_id: i for i, item_id in enumerate(ids)}
    proposed = {e.item_id for e in out.proposed}
    conf = probs.max(axis=1)
    least_proposed = min(conf[row[i]] for i in proposed)
    assert all(conf[row[i]] <= least_proposed + 1e-6 for i in ids if i not in proposed)
    for e in out.proposed:
        assert e.label == probs[row[e.item_id]].argmax() and e.confidence == pytest.approx(
            conf[row[e.item_id]]
        )
        assert e.audited == (unit_draw(e.item_id, "audit") < e.audit_prob)
        assert 0.0 < e.audit_prob <= 1.0
    # Nothing is accepted before its batch's audits are in, and nothing new is proposed meanwhile.
    assert not out.accept and any(e.audited for e in out.proposed)
    again = model.rescore(waiting, ids)
    assert not again.proposed and not again.accept
    # People answer the audits (and agree): the unaudited rest of the batch is accepted.
    audits = [e for e in out.proposed if e.audited]
    assert (
        model.add_labels(
            np.array([waiting[row[e.item_id]] for e in audits]),
            np.array([e.label for e in audits]),
            [e.item_id for e in audits],
        )
        == []
    )
    model.refit()
    left = [i for i in ids if i not in {e.item_id for e in audits}]
    settled = model.rescore(np.array([waiting[row[i]] for i in left]), left)
    assert {a[0] for a in settled.accept} == {e.item_id for e in out.proposed if not e.audited}
    assert all(a[1] == next(e.label for e in out.proposed if e.item_id == a[0]) for a in settled.accept)
    assert model.auto == len(settled.accept) and model.book.batch_state[1] == ACCEPTED
    assert model.certificate().met


def test_a_disagreeing_audit_goes_to_a_second_person() -> None:
    centers, X, _ = _world()
    model = ProjectModel(_spec(), centers, CONFIG)
    model.restore_proposal(Entry("item-0", 1, 2, 0.5, True), "pending")
    model.restore_proposal(Entry("item-1", 1, 1, 0.5, True), "pending")
    model.restore_proposal(Entry("item-2", 1, 0, 0.5, False), "pending")
    # item-0 disagrees (the model said 2), item-1 agrees, item-2 was not audited (it disagrees too:
    # settled by a second person as an audit would be).
    asked = model.add_labels(X[:4], np.array([0, 1, 1, 0]), _ids(0, 4))
    assert asked == [("item-0", 2), ("item-2", 0)]
    entry = model.book.latest("item-0")
    assert entry is not None and entry.disagreed is None and entry.adjudicating
    model.record_second_opinion("item-0", 2)  # sides with the model: no disagreement after all
    assert entry.disagreed is False
    assert model.book.audits() == (2, 0)
    unaudited = model.book.latest("item-2")
    assert unaudited is not None and unaudited.disagreed is None and unaudited.adjudicating
    model.record_second_opinion("item-2", 1)
    assert unaudited.disagreed is True


def test_restored_proposals_keep_their_state() -> None:
    centers, _, _ = _world()
    model = ProjectModel(_spec(), centers, CONFIG)
    model.restore_proposal(Entry("a", 1, 0, 0.2, False), "accepted")
    model.restore_proposal(Entry("b", 2, 0, 0.2, False), "rejected")
    model.restore_proposal(Entry("c", 3, 0, 0.2, True), "whatever")
    assert model.book.batch_state == {1: ACCEPTED, 2: REJECTED, 3: "pending"}
    assert model.book.rejected_at[2] == 0


def test_review_order_is_random_during_warm_up_then_by_ambiguity() -> None:
    centers, X, y = _world()
    model = ProjectModel(_spec(), centers, CONFIG)
    ids = _ids(100, 300)
    labels, conf, warm = model.decide(X[100:], ids)
    assert warm.tolist() == [unit_draw(i, "order") for i in ids]
    assert labels.tolist() == model.predict_proba(X[100:]).argmax(axis=1).tolist()
    assert np.allclose(conf, model.predict_proba(X[100:]).max(axis=1))
    model.add_labels(X[:20], y[:20], _ids(0, 20))
    model.refit()
    assert model.ranks_by_ambiguity
    _, _, later = model.decide(X[100:], ids)
    assert np.allclose(later, 1.0 - margin(model.predict_proba(X[100:])), atol=1e-6)


def test_project_settings_override_the_defaults() -> None:
    centers, X, y = _world()
    custom = _spec(
        target_accuracy=0.99,
        audit_rate=0.4,
        guarantee="automatic",
        delta=0.01,
        human_error=0.02,
        human_budget_items=70,
        human_budget_share=0.5,
    )
    model = ProjectModel(custom, centers, LRPolicyConfig(target_accuracy=0.8, min_human_labels=20))
    assert model.config.target_accuracy == 0.99 and model.config.min_human_labels == 20
    a = model.assumptions
    assert (a.guarantee, a.target, a.delta, a.human_error, a.n_classes) == (
        Guarantee.AUTOMATIC,
        0.99,
        0.01,
        0.02,
        3,
    )
    assert model.book.assumptions == a
    assert (model.budget.count, model.budget.share) == (70, 0.5)
    # Unset settings fall back to the defaults.
    plain = ProjectModel(_spec(target_accuracy=0.0), centers, LRPolicyConfig(target_accuracy=0.8))
    assert plain.config.target_accuracy == 0.8 and plain.assumptions.target == 0.8
    assert plain.assumptions.guarantee is Guarantee.DATASET and plain.assumptions.delta == 0.05
    # The project's audit rate is the proposals' audit floor.
    model = ProjectModel(_spec(audit_rate=0.4, target_accuracy=0.8), centers, CONFIG)
    model.seen = 300
    model.add_labels(X[:100], y[:100], _ids(0, 100))
    model.refit()
    out = model.rescore(X[100:], _ids(100, 300))
    assert out.proposed and min(e.audit_prob for e in out.proposed) == pytest.approx(0.4)


def test_human_budget_by_count_and_share() -> None:
    centers, X, y = _world()
    model = ProjectModel(_spec(human_budget_items=20), centers, CONFIG)
    model.seen = 200
    model.add_labels(X[:19], y[:19], _ids(0, 19))
    assert not model.budget_spent()
    model.add_labels(X[19:20], y[19:20], _ids(19, 20))
    assert model.budget_spent()
    labels = model.finalize(X[100:110])
    assert len(labels) == 10 and all(0 <= lbl < 3 and 0.0 < conf <= 1.0 for lbl, conf in labels)
    assert model.finalize(X[:0]) == []
    # A share rounds down: 10% of 199 items is 19 labels, of 200 (counting one more arriving) 20.
    shared = ProjectModel(_spec(human_budget_share=0.1), centers, CONFIG)
    shared.seen = 199
    shared.add_labels(X[:19], y[:19], _ids(0, 19))
    assert shared.budget_spent() and not shared.budget_spent(extra_seen=1)
    assert not ProjectModel(_spec(), centers, CONFIG).budget_spent()


def test_tally_counts_undecided_items_as_future_human_labels() -> None:
    centers, X, y = _world()
    model = ProjectModel(_spec(), centers, CONFIG)
    model.seen, model.auto, model.model_labeled = 100, 30, 5
    model.add_labels(X[:20], y[:20], _ids(0, 20))
    t = model.tally()
    assert (t.items, t.auto, t.human, t.model) == (100, 30, 20 + 45, 5)
    assert model.tally(undecided_as_human=False).human == 20
    # No proposal yet: the bound on wrong automatic labels is zero.
    assert model.certificate().auto_errors_upper == 0.0


def test_labels_grow_past_their_first_capacity_in_arrival_order() -> None:
    centers, X, y = _world()
    model = ProjectModel(_spec(), centers, CONFIG)
    for start in range(0, 150, 7):
        stop = min(start + 7, 150)
        model.add_labels(X[start:stop], y[start:stop], _ids(start, stop))
    assert model.n_labels == 150 and model.item_ids == _ids(0, 150)
    np.testing.assert_allclose(model.X, X[:150].astype(np.float32))
    assert model.y.tolist() == y[:150].tolist() and model.pending_labels == 150
    assert model.add_labels(X[:0], y[:0], []) == []
    model.refit()
    assert model.pending_labels == 0 and model.version == "lr-r1-n150"
    model.refit()  # nothing new: no refit
    assert model.refits == 1


def test_control_arm_samples_its_share_at_random() -> None:
    centers, _, _ = _world()
    model = ProjectModel(_spec(control_rate=0.1), centers, CONFIG)
    controls = [model.is_control(f"item-{i}") for i in range(5000)]
    assert 0.08 < np.mean(controls) < 0.12
    assert controls == [unit_draw(f"item-{i}", "control") < 0.1 for i in range(5000)]
    assert not any(ProjectModel(_spec(), centers, CONFIG).is_control(f"item-{i}") for i in range(100))


def test_confident_contradictions_of_human_labels_are_sent_for_a_second_opinion() -> None:
    centers, X, y = _world(noise=0.2)
    wrong = y[:120].copy()
    planted = [5, 17, 42, 88]
    for row in planted:
        wrong[row] = (wrong[row] + 1) % 3
    model = ProjectModel(_spec(), centers, CONFIG)
    model.add_labels(X[:29], wrong[:29], _ids(0, 29))
    model.refit()
    assert model.label_issues(limit=10) == []  # too few labels to trust the model
    model.add_labels(X[29:120], wrong[29:], _ids(29, 120))
    model.refit()
    issues = model.label_issues(limit=10)
    flagged = {s.item_id for s in issues}
    assert {f"item-{r}" for r in planted} <= flagged
    assert len(flagged) <= 6  # clean labels are left alone
    suggested = {s.item_id: s.label for s in issues}
    assert all(s.confidence >= 0.9 for s in issues)  # LABEL_AUDIT_MIN_CONFIDENCE
    assert all(suggested[f"item-{r}"] == y[r] for r in planted)
    assert len(model.label_issues(limit=2)) == 2 and model.label_issues(limit=0) == []
    model.second_opinion_asked.update(flagged)
    assert model.label_issues(limit=10) == []  # each label is re-checked once

    model.relabel("item-5", int(y[5]))
    assert model.y[5] == y[5] and model.pending_labels == 1
    model.relabel("unknown", 0)
    assert model.pending_labels == 1


def test_refits_make_out_of_fold_predictions_only_for_projects_that_check_labels() -> None:
    centers, X, y = _world(noise=0.2)
    checked = ProjectModel(_spec(), centers, CONFIG)
    unchecked = ProjectModel(_spec(), centers, CONFIG, second_opinions=False)
    for model in (checked, unchecked):
        model.add_labels(X[:100], y[:100], _ids(0, 100))
        model.refit()
    # Made in the refit (a worker thread in the scorer), not when label_issues reads them.
    assert checked.classifier.oof_labels == 100
    assert unchecked.classifier.oof_labels == 0 and unchecked.label_issues(limit=5) == []
    # Not again until the labels have grown by LRPolicyConfig.oof_refresh_growth.
    checked.add_labels(X[100:105], y[100:105], _ids(100, 105))
    checked.refit()
    assert checked.classifier.oof_labels == 100
    # The labels they missed are checked when the project falls quiet (the scorer's refit loop).
    assert checked.labels_unchecked() and not unchecked.labels_unchecked()
    checked.check_labels()
    assert checked.classifier.oof_labels == 105 and not checked.labels_unchecked()
    checked.add_labels(X[105:110], y[105:110], _ids(105, 110))
    checked.refit()
    assert checked.classifier.oof_labels == 105 and checked.labels_unchecked()
    checked.add_labels(X[110:116], y[110:116], _ids(110, 116))
    checked.refit()
    assert checked.classifier.oof_labels == 116


def test_a_re_proposed_item_gets_a_fresh_audit_draw() -> None:
    """A handed-back item was not audited the first time: its draw was at least that pi. Reusing the
    draw would make a re-proposal's audit less likely than the pi the certificate is told."""
    centers, X, y = _world(noise=0.2)
    model = ProjectModel(_spec(audit_rate=0.3), centers, CONFIG)
    model.seen = 300
    ids = _ids(100, 300)
    first = [Entry(i, 1, 0, 0.3, unit_draw(i, "audit") < 0.3) for i in ids]
    for e in first:
        model.restore_proposal(e, "rejected")
    handed_back = [k for k, e in enumerate(first) if not e.audited]
    model.add_labels(X[:100], y[:100], _ids(0, 100))
    model.refit()
    out = model.rescore(X[100:][handed_back], [ids[k] for k in handed_back])
    again = [e for e in out.proposed if e.item_id in {ids[k] for k in handed_back}]
    assert len(again) >= 30 and all(e.audit_prob == pytest.approx(0.3) for e in again)
    assert 0.1 < np.mean([e.audited for e in again]) < 0.5


def test_items_of_a_flagged_slice_are_audited_at_least_at_the_flagged_rate() -> None:
    centers, X, y = _world(noise=0.2)
    waiting, ids = X[100:], _ids(100, 300)
    flagged = np.arange(len(ids)) % 2 == 0  # every other waiting item is in the flagged slice

    def proposals(mark: np.ndarray | None) -> dict[str, float]:
        model = ProjectModel(_spec(), centers, CONFIG)
        model.seen = 300
        model.add_labels(X[:100], y[:100], _ids(0, 100))
        model.refit()
        return {e.item_id: e.audit_prob for e in model.rescore(waiting, ids, None, mark).proposed}

    plain, raised = proposals(None), proposals(flagged)
    assert plain.keys() == raised.keys() and plain
    in_slice = {ids[row] for row in np.flatnonzero(flagged)}
    for item_id, pi in raised.items():
        if item_id in in_slice:
            assert pi == max(plain[item_id], FLAGGED_SLICE_AUDIT)
        else:
            assert pi == plain[item_id]
    # The flagged rate is above what this pool's floor gives: the raise is real.
    assert any(plain[i] < FLAGGED_SLICE_AUDIT for i in in_slice & plain.keys())


def test_re_ranks_are_bounded_to_the_head_of_the_queue() -> None:
    rng = np.random.default_rng(3)
    new, old = rng.random(1000), rng.random(1000)
    rows = np.arange(0, 1000, 2)
    kept = head_of_queue(rows, new, old, 100)
    assert len(kept) <= 100 and set(kept.tolist()) <= set(rows.tolist())
    # The moved rows with the highest new priority and those with the highest old one are kept.
    assert set(rows[np.argsort(-new[rows])[:50]].tolist()) <= set(kept.tolist())
    assert set(rows[np.argsort(-old[rows])[:50]].tolist()) <= set(kept.tolist())


def test_a_blind_project_checks_labels_against_the_model_and_a_restart_replays_the_checks() -> None:
    centers, X, y = _world(noise=0.3)
    spec = _spec(hide_suggestions=True, human_error=0.02, target_accuracy=0.95)
    model = ProjectModel(spec, centers, CONFIG)
    model.seen = 200
    first_asked = model.add_labels(X[:60], y[:60], _ids(0, 60))  # against the label embeddings
    model.refit()
    given = y[60:200].copy()
    given[:6] = (given[:6] + 1) % 3  # a person's slips
    before = model.predict_proba(X[60:200]).argmax(axis=1)
    asked = model.add_labels(X[60:200], given, _ids(60, 200))
    # Every label that disagrees with the model's (before it learned them) goes to a second person.
    assert asked == [(f"item-{60 + i}", int(m)) for i, m in enumerate(before.tolist()) if m != given[i]]
    assert model.human_checks.checked_against(["item-61"]) == [("item-61", int(before[1]))]
    owed = first_asked + asked
    settled = dict(owed[:-2])
    for item_id, m in settled.items():
        model.record_second_opinion(item_id, m)  # sides with the model
        model.relabel(item_id, m)
    counts = model.human_checks.counts()
    assert (counts.agreed + counts.disagreed, counts.seconded) == (200, len(settled))
    assert counts.disagreed == len(owed)
    shown = ProjectModel(_spec(human_error=0.02, target_accuracy=0.95), centers, CONFIG)
    shown.seen = 200
    shown.add_labels(X[:200], y[:200], _ids(0, 200))
    # People's errors count for less than at the assumed 2% on every label.
    assert model.certificate().human_errors_upper < shown.certificate().human_errors_upper

    # A restart: the labels as they are now, then each check from what was stored.
    restored = ProjectModel(spec, centers, CONFIG)
    restored.seen = 200
    now = model.y.copy()
    restored.add_labels(model.X, now, list(model.item_ids), check=False)
    waiting = []
    for row, item_id in enumerate(model.item_ids):
        first = int(model.human_checks.first_label.get(item_id, now[row]))
        against = model.human_checks.model_label.get(item_id)
        second = against if item_id in settled else None
        if restored.restore_check(item_id, first, against, True, second, int(now[row])):
            waiting.append(item_id)
    assert restored.human_checks.counts() == counts
    assert waiting == [item_id for item_id, _ in owed[-2:]]  # still owed a second person
    assert restored.certificate().human_errors_upper == model.certificate().human_errors_upper


def test_a_label_given_with_a_suggestion_shown_is_never_checked() -> None:
    """A project that hid suggestions and shows them now (or a task served before the change):
    the review service says per label whether the person saw one."""
    centers, X, y = _world(noise=0.3)
    model = ProjectModel(_spec(hide_suggestions=True, human_error=0.02), centers, CONFIG)
    wrong = (y[:20] + 1) % 3
    assert model.add_labels(X[:20], wrong, _ids(0, 20), blind=[False] * 20) == []
    assert model.human_checks.counts().plain == 20
    assert model.add_labels(X[20:40], (y[20:40] + 1) % 3, _ids(20, 40), blind=[True] * 20)
