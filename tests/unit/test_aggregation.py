"""Label aggregation: majority vote, Dawid–Skene (crowd-kit, smoothed), agreement, Wilson."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from services.cli.bench_aggregation import AggregationBenchOptions, goal_line, run_offline
from services.cli.files import InputError
from services.review.aggregation import (
    DAWID_SKENE,
    MAJORITY_VOTE,
    Judgment,
    aggregate,
    fit_dawid_skene,
    fit_if_enough,
    krippendorff_alpha,
    majority_vote,
    pairwise_kappa,
    wilson,
)

LABELS = ["cat", "dog", "bird", "fish"]
# Three careful annotators, one who is right 40% of the time, one who answers at random.
ACCURACY: dict[str, float | None] = {"good1": 0.9, "good2": 0.9, "good3": 0.9, "bad": 0.4, "spammer": None}


def synthetic_crowd(items: int, seed: int, per_item: int = 3) -> tuple[dict[str, str], list[Judgment]]:
    rng = random.Random(seed)
    truth: dict[str, str] = {}
    judgments: list[Judgment] = []
    for i in range(items):
        item_id = f"item-{i}"
        truth[item_id] = true = rng.choice(LABELS)
        for annotator in rng.sample(sorted(ACCURACY), per_item):
            p = ACCURACY[annotator]
            if p is None:
                label = rng.choice(LABELS)
            elif rng.random() < p:
                label = true
            else:
                label = rng.choice([lb for lb in LABELS if lb != true])
            judgments.append(Judgment(item_id, annotator, label))
    return truth, judgments


def accuracy(predicted: dict[str, str], truth: dict[str, str]) -> float:
    return sum(predicted[i] == t for i, t in truth.items()) / len(truth)


# --- majority vote ---------------------------------------------------------------------------


def test_majority_vote_takes_the_most_frequent_label_with_its_share() -> None:
    result = majority_vote(
        [Judgment("x", "a", "dog"), Judgment("x", "b", "dog"), Judgment("x", "c", "cat")], LABELS
    )
    assert result["x"].label == "dog"
    assert result["x"].posterior == pytest.approx(2 / 3)
    assert result["x"].method == MAJORITY_VOTE


def test_majority_vote_breaks_ties_by_project_label_order_else_by_name() -> None:
    tied = [Judgment("x", "a", "dog"), Judgment("x", "b", "cat")]
    assert majority_vote(tied, ["dog", "cat"])["x"].label == "dog"
    assert majority_vote(list(reversed(tied)), ["dog", "cat"])["x"].label == "dog"
    assert majority_vote(tied, ["cat", "dog"])["x"].label == "cat"
    assert majority_vote(tied)["x"].label == "cat"  # alphabetical without a label order
    assert majority_vote(tied)["x"].posterior == 0.5


def test_a_repeated_judgment_replaces_the_earlier_one() -> None:
    judgments = [Judgment("x", "a", "cat"), Judgment("x", "b", "dog"), Judgment("x", "a", "dog")]
    result = majority_vote(judgments, LABELS)["x"]
    assert (result.label, result.posterior) == ("dog", 1.0)


# --- Dawid–Skene -----------------------------------------------------------------------------


def test_dawid_skene_beats_majority_vote_and_learns_who_to_trust() -> None:
    truth, judgments = synthetic_crowd(300, seed=1)
    model = fit_dawid_skene(judgments, LABELS)
    ds = {item: a.label for item, a in model.aggregates().items()}
    mv = {item: a.label for item, a in majority_vote(judgments, LABELS).items()}
    assert accuracy(ds, truth) >= accuracy(mv, truth) + 0.04
    assert accuracy(ds, truth) >= 0.88

    learned = model.annotator_accuracy()
    for good in ("good1", "good2", "good3"):
        assert learned[good] == pytest.approx(0.9, abs=0.06)
    assert learned["bad"] == pytest.approx(0.4, abs=0.12)
    assert learned["spammer"] == pytest.approx(0.25, abs=0.12)
    assert max(learned["bad"], learned["spammer"]) < min(learned[g] for g in ("good1", "good2", "good3"))
    np.testing.assert_allclose(model.confusions.sum(axis=2), 1.0)
    np.testing.assert_allclose(model.posteriors.sum(axis=1), 1.0)
    assert model.labels == tuple(LABELS)
    assert model.iterations >= 1


def test_posterior_of_an_item_agrees_with_the_fit() -> None:
    _, judgments = synthetic_crowd(200, seed=2)
    model = fit_dawid_skene(judgments, LABELS)
    for i in (0, 17, 123):
        item_id = model.items[i]
        votes = [(j.annotator_id, j.label) for j in judgments if j.item_id == item_id]
        np.testing.assert_allclose(model.posterior(votes), model.posteriors[i], atol=1e-12)


def test_posterior_of_a_new_item_trusts_the_good_annotator_over_the_spammer() -> None:
    _, judgments = synthetic_crowd(300, seed=3)
    model = fit_dawid_skene(judgments, LABELS)
    one_to_one = model.posterior([("good1", "fish"), ("spammer", "cat")])
    assert LABELS[int(one_to_one.argmax())] == "fish"
    # Someone the model never saw counts as the average annotator: one vote wins against none.
    newcomer = model.posterior([("newcomer", "bird")])
    assert LABELS[int(newcomer.argmax())] == "bird"
    assert newcomer.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not one of the project's labels"):
        model.posterior([("good1", "horse")])


def test_a_label_nobody_chose_in_the_fit_can_still_win() -> None:
    labels = [*LABELS, "horse"]
    _, judgments = synthetic_crowd(100, seed=4)
    model = fit_dawid_skene(judgments, labels)
    assert model.priors[4] > 0
    posterior = model.posterior([("good1", "horse"), ("good2", "horse")])
    assert labels[int(posterior.argmax())] == "horse"


def test_the_fitted_arrays_are_read_only() -> None:
    _, judgments = synthetic_crowd(60, seed=5)
    model = fit_dawid_skene(judgments, LABELS)
    with pytest.raises(ValueError):
        model.confusions[0, 0, 0] = 1.0


def test_aggregate_falls_back_to_majority_vote_on_small_data() -> None:
    truth, judgments = synthetic_crowd(300, seed=6)
    few = [j for j in judgments if int(j.item_id.split("-")[1]) < 10]
    result, method = aggregate(few, LABELS)
    assert method == MAJORITY_VOTE
    assert len(result) == 10
    assert fit_if_enough(few, LABELS) is None

    result, method = aggregate(judgments, LABELS)
    assert method == DAWID_SKENE
    assert len(result) == len(truth)
    assert {a.method for a in result.values()} == {DAWID_SKENE}


def test_dawid_skene_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="two distinct labels"):
        fit_dawid_skene([Judgment("x", "a", "cat")], ["cat"])
    with pytest.raises(ValueError, match="not one of the project's labels"):
        fit_dawid_skene([Judgment("x", "a", "horse")], LABELS)


# --- agreement -------------------------------------------------------------------------------


def test_krippendorff_alpha_is_one_for_perfect_agreement_and_near_zero_for_chance() -> None:
    perfect = [Judgment(f"i{i}", a, LABELS[i % 4]) for i in range(40) for a in ("a", "b", "c")]
    assert krippendorff_alpha(perfect, LABELS) == pytest.approx(1.0)

    rng = random.Random(7)
    chance = [Judgment(f"i{i}", a, rng.choice(LABELS)) for i in range(2000) for a in ("a", "b", "c")]
    assert abs(krippendorff_alpha(chance, LABELS)) < 0.03


def test_krippendorff_alpha_is_nan_when_undefined() -> None:
    one_label = [Judgment(f"i{i}", a, "cat") for i in range(5) for a in ("a", "b")]
    assert math.isnan(krippendorff_alpha(one_label, LABELS))
    no_overlap = [Judgment(f"i{i}", "a", LABELS[i % 4]) for i in range(8)]
    assert math.isnan(krippendorff_alpha(no_overlap, LABELS))


def test_krippendorff_alpha_known_value() -> None:
    # Two coders, four items, disagreeing on one: o = [[2,1],[1,4]] coincidences over 8 values,
    # D_o = 2/8, D_e = 2·3·5 / (8·7) → alpha = 1 - (2/8) / (30/56) = 8/15.
    judgments = [
        Judgment("1", "a", "cat"),
        Judgment("1", "b", "cat"),
        Judgment("2", "a", "dog"),
        Judgment("2", "b", "dog"),
        Judgment("3", "a", "dog"),
        Judgment("3", "b", "dog"),
        Judgment("4", "a", "cat"),
        Judgment("4", "b", "dog"),
    ]
    assert krippendorff_alpha(judgments, LABELS) == pytest.approx(1 - (2 / 8) / (30 / 56))


def test_pairwise_kappa_needs_min_items_in_common() -> None:
    a_labels = ["cat", "cat", "dog", "dog"] * 3
    b_labels = ["cat", "dog", "dog", "dog"] * 3
    judgments = [Judgment(f"i{i}", "a", lb) for i, lb in enumerate(a_labels)]
    judgments += [Judgment(f"i{i}", "b", lb) for i, lb in enumerate(b_labels)]
    judgments += [Judgment(f"i{i}", "c", lb) for i, lb in enumerate(a_labels[:9])]

    pairs = pairwise_kappa(judgments, min_items=10)
    assert [(p.a, p.b, p.items) for p in pairs] == [("a", "b", 12)]
    # p_o = 0.75, p_e = 0.5·0.25 + 0.5·0.75 = 0.5 → kappa = 0.5
    assert pairs[0].kappa == pytest.approx(0.5)

    pairs = pairwise_kappa(judgments, min_items=9)
    assert [(p.a, p.b, p.items) for p in pairs] == [("a", "b", 12), ("a", "c", 9), ("b", "c", 9)]
    assert pairs[1].kappa == pytest.approx(1.0)


def test_pairwise_kappa_is_nan_when_both_give_one_label() -> None:
    judgments = [Judgment(f"i{i}", a, "cat") for i in range(10) for a in ("a", "b")]
    (pair,) = pairwise_kappa(judgments)
    assert math.isnan(pair.kappa)


# --- Wilson ----------------------------------------------------------------------------------


def test_wilson_known_values() -> None:
    rate = wilson(8, 10)
    assert (rate.value, rate.n) == (0.8, 10)
    assert rate.low == pytest.approx(0.4902, abs=1e-4)
    assert rate.high == pytest.approx(0.9433, abs=1e-4)

    none = wilson(0, 10)
    assert (none.value, none.low) == (0.0, 0.0)
    assert none.high == pytest.approx(0.2775, abs=1e-4)

    assert wilson(10, 10).high == 1.0
    empty = wilson(0, 0)
    assert (empty.value, empty.low, empty.high, empty.n) == (0.0, 0.0, 0.0, 0)
    with pytest.raises(ValueError):
        wilson(11, 10)


# --- the offline benchmark -------------------------------------------------------------------


def test_offline_benchmark_on_a_synthetic_crowd(tmp_path: Path) -> None:
    # Every item judged by all five annotators; the bench samples k of them per repeat.
    truth, judgments = synthetic_crowd(300, seed=8, per_item=5)
    raw: dict[str, dict[str, str]] = {}
    for j in judgments:
        raw.setdefault(j.item_id, {})[j.annotator_id] = j.label
    data = tmp_path / "crowd.jsonl"
    data.write_text(
        "".join(json.dumps({"id": i, "label": truth[i], "annotator_labels": raw[i]}) + "\n" for i in truth)
    )
    rows = run_offline(AggregationBenchOptions(data=data, overlaps=(3, 5), repeat=2, seed=0))
    assert [(r.overlap, r.items, r.repeats) for r in rows] == [(3, 300, 2), (5, 300, 2)]
    for r in rows:
        assert r.dawid_skene_mean > r.majority_vote_mean
        assert r.difference == pytest.approx(r.dawid_skene_mean - r.majority_vote_mean)
    assert "met" in goal_line(rows) and "not met" not in goal_line(rows)
    assert "not measured" in goal_line(rows[:1])


def test_offline_benchmark_explains_bad_input(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        run_offline(AggregationBenchOptions(data=tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "label": "cat"}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl:1: .*annotator_labels"):
        run_offline(AggregationBenchOptions(data=bad))
