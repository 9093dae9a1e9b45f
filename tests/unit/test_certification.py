"""services/scorer/policy/certification.py and the acceptance it drives (ProposalBook, ProjectModel):
the anytime-valid bound on the wrong labels among what the model labeled alone.

The coverage tests simulate thousands of proposal streams at once with numpy. The library computes
its bound one ledger at a time, too slowly for that; `_Streams` evaluates the same statistic for
every stream together, and each check compares it with `disagreement_upper` on the first streams
(same decisions, same bound), so the coverage measured is the library's.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pytest

from services.common.projects import LabelSpec, ProjectSpec
from services.scorer.policy.centroids import softmax
from services.scorer.policy.certification import (
    ACCEPTED_BATCH,
    GAMMAS,
    PENDING_BATCH,
    REJECTED_BATCH,
    Assumptions,
    Certificate,
    Guarantee,
    Ledger,
    Tally,
    binomial_upper,
    certify,
    disagreement_upper,
    error_bounds,
    lower_bound,
    mixture_upper,
    planned_upper,
    wilson_lower_bound,
)
from services.scorer.policy.features import features
from services.scorer.policy.model import LRPolicyConfig
from services.scorer.policy.proposals import (
    ACCEPTED,
    PENDING,
    PLANNING_FLOOR,
    REJECTED,
    Entry,
    ProposalBook,
    audit_probability,
)
from services.scorer.service import ProjectModel

# Audit probabilities on a grid of 0.005: a stream's bets and costs are then sums over a table.
_GRID = np.arange(1, 200) / 200.0
# Per grid value and bet size: the bet (capped at 0.9 of -log(1 - pi)) and the cost of an audited
# disagreement, c = -log(1 - (1 - exp(-gamma)) / pi) - gamma (certification.py's docstring).
_BET = np.minimum(GAMMAS[None, :], 0.9 * -np.log1p(-_GRID)[:, None])
_COST = -np.log1p(np.expm1(-_BET) / _GRID[:, None]) - _BET


def _per_stream(cell: np.ndarray, mask: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Sum of table rows over the masked items of each stream: (R, m) grid cells -> (R, J)."""
    r, g = cell.shape[0], len(_GRID)
    flat = (np.arange(r)[:, None] * g + cell)[mask]
    counts = np.bincount(flat, minlength=r * g).reshape(r, g)
    out: np.ndarray = counts @ table
    return out


class _Batch:
    """One batch in every stream: per stream, what its bound needs (sums over the batch's items)."""

    def __init__(self, cell: np.ndarray, audited: np.ndarray, disagree: np.ndarray) -> None:
        self.cell = cell  # (R, m) grid index of each item's audit probability
        self.audited = audited  # (R, m) the draw sent it to people
        self.disagree = disagree  # (R, m) the truth: the model's label and people's disagree
        self.audits_in = False
        self.state = np.full(cell.shape[0], PENDING_BATCH)
        self.labeled = np.zeros(cell.shape[0], dtype=bool)  # handed back and labeled by people since
        unaudited = ~audited
        self.cost_seen = _per_stream(cell, audited & disagree, _COST)
        self.cost_pending = _per_stream(cell, audited, _COST)  # every audit counted as a disagreement
        self.gain_known = _per_stream(cell, unaudited & disagree, _BET)
        self.min_pi = np.where(unaudited, _GRID[cell], np.inf).min(axis=1)
        self.unaudited = unaudited.sum(axis=1)
        self.slipped = (unaudited & disagree).sum(axis=1)


class _Streams:
    """R proposal streams side by side: batches proposed, audited, accepted or rejected."""

    def __init__(self, runs: int, delta: float) -> None:
        self.runs, self.delta, self.batches = runs, delta, list[_Batch]()

    def statistic(self, trial: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(Gamma (R, J), offset (R, J), unaudited items of accepted batches (R,)); batch `trial`
        counted as accepted where it is pending."""
        r = self.runs
        min_pi, offset, slipping = np.full(r, np.inf), np.zeros((r, len(GAMMAS))), np.zeros(r)
        for k, b in enumerate(self.batches):
            state = np.where(b.state == PENDING_BATCH, ACCEPTED_BATCH, b.state) if k == trial else b.state
            accepted, rejected = state == ACCEPTED_BATCH, (state == REJECTED_BATCH)[:, None]
            min_pi = np.where(accepted, np.minimum(min_pi, b.min_pi), min_pi)
            slipping += np.where(accepted, b.unaudited, 0)
            cost = b.cost_seen if b.audits_in else b.cost_pending  # pending audits disagree
            gain = np.where(b.labeled[:, None], b.gain_known, 0.0) - cost
            offset += np.where(rejected, np.minimum(gain, 0.0), -cost)
        cap = 0.9 * -np.log1p(-np.where(np.isfinite(min_pi), min_pi, 0.5))
        gamma = np.where(np.isfinite(min_pi)[:, None], np.minimum(GAMMAS[None, :], cap[:, None]), GAMMAS)
        return gamma, offset, slipping

    def bound_below(self, s: np.ndarray, gamma: np.ndarray, offset: np.ndarray) -> np.ndarray:
        """Per stream: the upper bound is below s (the mixture at s reaches 1/delta)."""
        z = s[:, None] * gamma + offset - math.log(len(GAMMAS))
        top = z.max(axis=1)
        log_mixture = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
        out: np.ndarray = log_mixture >= math.log(1.0 / self.delta)
        return out

    def slipped(self) -> np.ndarray:
        return sum(
            (np.where(b.state == ACCEPTED_BATCH, b.slipped, 0) for b in self.batches), np.zeros(self.runs)
        )

    def ledger(self, run: int) -> Ledger:
        """Stream `run` as the library's ledger."""
        if not self.batches:
            return Ledger.empty()
        parts = []
        for k, b in enumerate(self.batches):
            audited, truth = b.audited[run], b.disagree[run].astype(np.float64)
            known = ~audited & bool(b.labeled[run])
            seen = np.where(audited, truth if b.audits_in else 1.0, np.where(known, truth, 0.0))
            n = len(audited)
            parts.append(
                (_GRID[b.cell[run]], audited, seen, known, np.full(n, k + 1), np.full(n, b.state[run]))
            )
        cols = [np.concatenate(c) for c in zip(*parts, strict=True)]
        return Ledger(cols[0], cols[1], cols[2], cols[3], cols[4], cols[5].astype(np.int8))

    def violations(self, checked_runs: int) -> np.ndarray:
        """Streams whose slipped disagreements exceed the bound now; the first `checked_runs`
        streams are compared with the library's bound."""
        gamma, offset, slipping = self.statistic()
        s = self.slipped()
        out: np.ndarray = (s > 0) & self.bound_below(s, gamma, offset)
        for run in range(checked_runs):
            lib = disagreement_upper(self.ledger(run), self.delta)
            assert bool(s[run] > lib) == bool(out[run])
            if 0.0 < lib < slipping[run]:  # the statistic crosses 1/delta right at the library's bound
                g, o = gamma[run : run + 1], offset[run : run + 1]
                assert self.bound_below(np.array([lib * (1 + 1e-6) + 1e-9]), g, o)[0]
                assert not self.bound_below(np.array([lib * (1 - 1e-6)]), g, o)[0]
            else:
                assert lib == pytest.approx(slipping[run])
        return out

    def settle(self, target: float | None) -> tuple[np.ndarray, np.ndarray]:
        """Accept pending batches, oldest first, where the bound allows an accuracy of `target` on
        the accepted items (None: every batch whose audits are in); reject those whose audits are in
        and that do not fit. Returns per stream (accepted any, rejected any)."""
        auto = sum(
            (np.where(b.state == ACCEPTED_BATCH, b.unaudited, 0) for b in self.batches), np.zeros(self.runs)
        )
        any_acc, any_rej = np.zeros(self.runs, dtype=bool), np.zeros(self.runs, dtype=bool)
        for k, b in enumerate(self.batches):
            pending = b.state == PENDING_BATCH
            if not pending.any():
                continue
            if target is None:
                fits = np.full(self.runs, b.audits_in)
            else:
                gamma, offset, slipping = self.statistic(trial=k)
                room = (1.0 - target) * (auto + b.unaudited)
                fits = (slipping <= room) | self.bound_below(room, gamma, offset)
            acc, rej = pending & fits, pending & ~fits & b.audits_in
            b.state = np.where(acc, ACCEPTED_BATCH, np.where(rej, REJECTED_BATCH, b.state))
            auto = auto + np.where(acc, b.unaudited, 0)
            any_acc |= acc
            any_rej |= rej
        return any_acc, any_rej


@dataclass(frozen=True)
class _Scenario:
    target: float | None  # None: every batch accepted once its audits are in
    adaptive: bool  # audit probabilities rise with the disagreements seen; the errors adapt too
    delta: float = 0.05
    base_pi: float = 0.05
    error_rate: float = 0.05


def _simulate(sc: _Scenario, runs: int, batches: int, size: int, seed: int) -> dict[str, float]:
    """Streams of proposals in batches. 30% of each batch is audited at 0.3-0.9, the rest at a low
    rate (`base_pi`, rising with the disagreements seen when adaptive), and every error sits on a
    low-rate item. When adaptive, the adversary also adapts its error rate to what happened: up
    after a batch was accepted, down once audits caught its errors. Checked after every settlement
    and every proposal."""
    rng = np.random.default_rng(seed)
    streams = _Streams(runs, sc.delta)
    seen = np.zeros(runs)  # audited disagreements found so far
    rate = np.full(runs, sc.error_rate)
    violated = np.zeros(runs, dtype=bool)
    careless = np.zeros(runs, dtype=bool)  # the same bound without the cost of audited disagreements
    beaten = np.zeros(runs, dtype=bool)  # the plain inverse-probability estimate was exceeded
    estimate = np.zeros(runs)
    delay = sc.target is not None  # audits come in one step after their batch was proposed

    def audits_in(b: _Batch) -> None:
        nonlocal seen, rate
        b.audits_in = True
        found = (b.audited & b.disagree).sum(axis=1)
        seen = seen + found
        if sc.adaptive:
            rate = np.where(found > 0, rate / 1.5, rate)

    def settle() -> None:
        nonlocal rate
        accepted, _ = streams.settle(sc.target)
        if sc.adaptive:
            rate = np.where(accepted, np.minimum(rate * 1.5, 0.3), rate)

    for step in range(batches + 1):
        if delay and step > 0:
            audits_in(streams.batches[-1])
        for b in streams.batches:
            b.labeled |= b.state == REJECTED_BATCH  # people labeled what was handed back
        settle()
        violated |= streams.violations(checked_runs=3)
        if step == batches:
            break
        low = np.broadcast_to(
            np.minimum(sc.base_pi * (np.sqrt(1.0 + seen) if sc.adaptive else 1.0), 0.25), runs
        )
        pi = np.where(
            rng.random((runs, size)) < 0.3,
            rng.uniform(0.3, 0.9, (runs, size)),
            low[:, None] * rng.uniform(1.0, 1.2, (runs, size)),
        )
        cell = np.clip(np.rint(pi * 200).astype(int) - 1, 0, len(_GRID) - 1)
        pi = _GRID[cell]
        disagree = (pi < 0.3) & (rng.random((runs, size)) < rate[:, None])
        audited = rng.random((runs, size)) < pi  # drawn after pi and the errors were fixed
        batch = _Batch(cell, audited, disagree)
        streams.batches.append(batch)
        if not delay:
            audits_in(batch)
            settle()
            s = streams.slipped()
            estimate += ((audited & disagree) * (1.0 - pi) / pi).sum(axis=1)
            beaten |= s > estimate
            gamma, _, _ = streams.statistic()
            careless |= (s > 0) & streams.bound_below(s, gamma, np.zeros_like(gamma))
        violated |= streams.violations(checked_runs=3)
    gamma, offset, slipping = streams.statistic()
    states = np.array([b.state for b in streams.batches])
    return {
        "violations": float(violated.mean()),
        "beaten": float(beaten.mean()),
        "careless": float(careless.mean()),
        "slipped": float(streams.slipped().mean()),
        "half_excluded": float(streams.bound_below(0.5 * slipping, gamma, offset).mean()),
        "accepted": float((states == ACCEPTED_BATCH).mean()),
    }


# -- coverage of the confidence sequence --------------------------------------------------------

_RUNS = 2000


@pytest.mark.parametrize(
    "scenario",
    [
        # Every batch accepted once its audits are in: the plain sequence over all proposals.
        _Scenario(target=None, adaptive=False, error_rate=0.15),
        _Scenario(target=None, adaptive=True, error_rate=0.15),
        # Batches accepted or handed back on what their audits show.
        _Scenario(target=0.6, adaptive=True, base_pi=0.1),
        _Scenario(target=0.5, adaptive=True, delta=0.2, error_rate=0.15),
    ],
    ids=["all-accepted", "all-accepted-adaptive", "accept-or-reject", "accept-or-reject-delta-0.2"],
)
def test_the_bound_covers_the_slipped_disagreements_at_every_moment(scenario: _Scenario) -> None:
    out = _simulate(scenario, runs=_RUNS, batches=10, size=200, seed=17)
    delta = scenario.delta
    # Share of runs in which the bound was below the truth at any check; measured (seed 17):
    # 0.6%, 0.4%, 0.25% at delta 0.05 and 3.65% at delta 0.2.
    assert out["violations"] <= delta + 3.0 * math.sqrt(delta * (1.0 - delta) / _RUNS), out
    # The setting puts the bound to work: errors do slip through accepted batches...
    assert out["slipped"] > 50.0, out
    if scenario.target is None:
        # ...more than the plain inverse-probability estimate says in most runs, and a bound that
        # ignored the cost of the audited disagreements would fail in nearly every run...
        assert out["beaten"] > 0.5 and out["careless"] > 0.9, out
        # ...while the bound rules out half of the unaudited items being wrong in nearly all.
        assert out["half_excluded"] > 0.95, out
    else:
        assert 0.3 < out["accepted"] < 0.95, out  # both fates happen


# -- the bound itself ---------------------------------------------------------------------------


def _clean_ledger(n: int, pi: float, seed: int) -> Ledger:
    rng = np.random.default_rng(seed)
    return Ledger(np.full(n, pi), rng.random(n) < pi, np.zeros(n))


def test_without_disagreements_the_bound_is_far_below_the_unaudited_count() -> None:
    ledger = _clean_ledger(4000, 0.05, seed=3)
    unaudited = int((~ledger.audited).sum())
    upper = disagreement_upper(ledger, 0.05)
    assert unaudited > 3700
    assert upper < 200.0
    # No valid bound can go lower: that many errors all escape the audits with probability delta.
    assert upper >= math.log(1 / 0.05) / -math.log1p(-0.05)
    # Audited more often, the same clean record rules out more.
    assert disagreement_upper(_clean_ledger(4000, 0.2, seed=3), 0.05) < upper / 3


def test_the_bound_grows_with_observed_disagreements() -> None:
    ledger = _clean_ledger(4000, 0.05, seed=3)
    audited_rows = np.flatnonzero(ledger.audited)
    uppers = []
    for k in (0, 1, 2, 5, 10, 20):
        seen = np.zeros(4000)
        seen[audited_rows[:k]] = 1.0
        uppers.append(disagreement_upper(Ledger(ledger.audit_prob, ledger.audited, seen), 0.05))
    assert all(b > a for a, b in itertools.pairwise(uppers)), uppers
    # Each disagreement seen at pi = 0.05 stands for about (1 - pi) / pi = 19 unseen.
    assert 15.0 * 20 < uppers[-1] - uppers[0] < 40.0 * 20
    # A disagreement audited at a high rate stands for fewer unseen ones than one at a low rate.
    pi = np.where(np.arange(4000) % 2 == 0, 0.05, 0.5)
    rng = np.random.default_rng(4)
    audited = rng.random(4000) < pi
    low = np.zeros(4000)
    low[np.flatnonzero(audited & (pi == 0.05))[:5]] = 1.0
    high = np.zeros(4000)
    high[np.flatnonzero(audited & (pi == 0.5))[:5]] = 1.0
    assert disagreement_upper(Ledger(pi, audited, high), 0.05) < disagreement_upper(
        Ledger(pi, audited, low), 0.05
    )


def test_the_bound_is_monotone_in_the_disagreement_weights() -> None:
    rng = np.random.default_rng(5)
    n = 1500
    pi = rng.choice([0.05, 0.1, 0.3, 0.8], size=n)
    audited = rng.random(n) < pi
    for _ in range(20):
        lighter = np.where(audited, rng.random(n) * (rng.random(n) < 0.2), 0.0)
        heavier = np.minimum(lighter + np.where(audited, rng.random(n) * (rng.random(n) < 0.1), 0.0), 1.0)
        a = disagreement_upper(Ledger(pi, audited, lighter), 0.05)
        b = disagreement_upper(Ledger(pi, audited, heavier), 0.05)
        assert a < b, (a, b)
    # A smaller delta is a larger bound.
    assert disagreement_upper(Ledger(pi, audited, lighter), 0.01) > a


def test_mixture_upper_edges() -> None:
    gamma = GAMMAS.copy()
    with pytest.raises(ValueError):
        mixture_upper(gamma, np.zeros_like(gamma), 10.0, 0.0)
    with pytest.raises(ValueError):
        mixture_upper(gamma, np.zeros_like(gamma), 10.0, 1.0)
    assert mixture_upper(gamma, np.zeros_like(gamma), 0.0, 0.05) == 0.0
    # Costs so large that nothing is ruled out: the bound is every unaudited item.
    assert mixture_upper(gamma, np.full_like(gamma, 1e6), 123.0, 0.05) == 123.0
    # Largest S whose mixture stays below 1/delta: with one bet, (log(1/delta) + b) / gamma.
    s = mixture_upper(np.array([0.1]), np.array([2.0]), 1000.0, 0.05)
    assert s == pytest.approx((math.log(20.0) + 2.0) / 0.1, rel=1e-9)
    assert disagreement_upper(Ledger.empty(), 0.05) == 0.0


def test_planned_upper_expects_more_disagreements_from_less_confident_items() -> None:
    ledger = _clean_ledger(1000, 0.1, seed=6)
    pi = np.full(500, 0.1)
    sure = planned_upper(ledger, pi, np.full(500, 0.001), 0.05)
    unsure = planned_upper(ledger, pi, np.full(500, 0.05), 0.05)
    assert sure < unsure <= float((~ledger.audited).sum()) + 450.0
    # Planning adds the new batch's items to what may slip through.
    assert sure > disagreement_upper(ledger, 0.05)


# -- people's errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "rate", "delta"), [(5, 0.5, 0.05), (50, 0.02, 0.05), (200, 0.3, 0.1), (4000, 0.01, 0.01)]
)
def test_binomial_upper_covers_binomial_draws(n: int, rate: float, delta: float) -> None:
    rng = np.random.default_rng(8)
    bound = binomial_upper(n, rate, delta)
    draws = rng.binomial(n, rate, size=20000)
    # The exact quantile: exceeded at most delta of the time (up to the draws' own noise), and
    # never looser than Chernoff's bound in Bernstein's form.
    assert (draws > bound).mean() <= delta + 3.0 * np.sqrt(delta * (1.0 - delta) / draws.size)
    log_inv = np.log(1.0 / delta)
    assert (
        n * rate
        < bound
        <= min(n, n * rate + log_inv / 3.0 + np.sqrt(log_inv**2 / 9.0 + 2.0 * n * rate * log_inv))
    )
    assert binomial_upper(n - 0.5, rate, delta) == bound  # a fractional count: that of ceil(n)
    assert binomial_upper(0, rate, delta) == 0.0 and binomial_upper(n, 0.0, delta) == 0.0


def test_error_bounds_with_people_taken_as_right_is_the_identity() -> None:
    right = Assumptions(Guarantee.DATASET, 0.95, human_error=0.0, n_classes=4)
    assert right.deltas() == (0.05, 0.0, 0.0)
    assert error_bounds(12.5, 100, 50, right) == (12.5, 0.0)
    assert error_bounds(-3.0, 100, 50, right) == (0.0, 0.0)
    assert error_bounds(150.0, 100, 50, right) == (100.0, 0.0)  # never more than the automatic labels


@pytest.mark.parametrize(("h", "k"), [(0.1, 2), (0.05, 4), (0.2, 3)])
@pytest.mark.parametrize("errors", [1, 3, 30, 300, 1000])
def test_error_bounds_cover_model_errors_people_hide(h: float, k: int, errors: int) -> None:
    """Each model error goes to a person; it stays hidden when they pick the model's wrong label, or
    when they do not and the second person (asked because they disagreed) picks it."""
    a = Assumptions(Guarantee.DATASET, 0.95, delta=0.05, human_error=h, n_classes=k)
    rng = np.random.default_rng(9)
    runs = 4000
    same = h / (k - 1)
    first = rng.random((runs, errors)) < same
    second = rng.random((runs, errors)) < same
    disagreements = errors - (first | second).sum(axis=1)
    auto = errors + 5000
    bounds = {int(d): error_bounds(float(d), auto, 0, a)[0] for d in np.unique(disagreements)}
    missed = np.mean([bounds[int(d)] < errors for d in disagreements])
    assert missed <= a.deltas()[1] + 3.0 * math.sqrt(a.deltas()[1] / runs)
    # Not vacuous: well below every automatic label.
    assert bounds[int(np.median(disagreements))] < errors * (1.0 + 4.0 * a.agree_when_wrong) + 30.0


def test_error_bounds_cover_wrong_human_labels() -> None:
    a = Assumptions(Guarantee.DATASET, 0.95, delta=0.05, human_error=0.03, n_classes=5)
    rng = np.random.default_rng(10)
    for human in (20, 800, 5000):
        _, bound = error_bounds(0.0, 0, human, a)
        wrong = rng.binomial(human, 0.03, size=20000)
        assert (wrong > bound).mean() <= a.deltas()[2]
        assert bound < human
    assert a.agree_when_wrong == pytest.approx(1.0 - (1.0 - 0.03 / 4) ** 2)


# -- certificates -------------------------------------------------------------------------------


def test_lower_bound_arithmetic() -> None:
    auto, dataset = Guarantee.AUTOMATIC, Guarantee.DATASET
    # 10 wrong of 400 automatic labels: 97.5%; in a dataset of 1000 with 5 wrong human labels and
    # 20 unchecked model labels (counted wrong): 1 - 35/1000.
    assert lower_bound(auto, 10, 5, 1000, 400, 20) == pytest.approx(0.975)
    assert lower_bound(dataset, 10, 5, 1000, 400, 20) == pytest.approx(0.965)
    assert lower_bound(auto, 0, 0, 1000, 0, 0) == 1.0  # no automatic label, nothing wrong
    assert lower_bound(dataset, 0, 0, 0, 0, 0) == 1.0
    assert lower_bound(dataset, 900, 200, 1000, 900, 0) == 0.0  # never negative

    tally = Tally(items=1000, auto=400, human=580, model=20)
    cert = Certificate(auto, 0.97, 0.05, 0.0, tally, auto_errors_upper=10.0, human_errors_upper=5.0)
    assert cert.lower_bound == pytest.approx(0.975) and cert.met
    assert not Certificate(auto, 0.98, 0.05, 0.0, tally, 10.0, 5.0).met
    cert = Certificate(dataset, 0.965, 0.05, 0.0, tally, 10.0, 5.0)
    assert cert.lower_bound == pytest.approx(0.965) and cert.met
    assert not Certificate(dataset, 0.97, 0.05, 0.0, tally, 10.0, 5.0).met


def test_certify_reads_the_bound_against_the_tally() -> None:
    ledger = _clean_ledger(4000, 0.05, seed=3)
    upper = disagreement_upper(ledger, 0.05)
    slipped = int((~ledger.audited).sum())
    tally = Tally(items=40000, auto=slipped, human=40000 - slipped, model=0)
    right = Assumptions(Guarantee.AUTOMATIC, 0.95)
    cert = certify(ledger, tally, right)
    assert cert.auto_errors_upper == pytest.approx(upper) and cert.human_errors_upper == 0.0
    # The same evidence: about 98% on the automatic labels alone, 99.8% on the whole dataset.
    assert cert.lower_bound == pytest.approx(1.0 - upper / slipped)
    dataset = certify(ledger, tally, Assumptions(Guarantee.DATASET, 0.99))
    assert dataset.lower_bound == pytest.approx(1.0 - upper / 40000) and dataset.met
    assert not certify(ledger, tally, Assumptions(Guarantee.AUTOMATIC, 0.99)).met
    # Fewer automatic labels than the bound: at most all of them are wrong.
    few = certify(ledger, Tally(items=40000, auto=50, human=39950, model=0), right)
    assert upper > 50 and few.auto_errors_upper == 50.0 and few.lower_bound == 0.0
    # Assumed human errors split delta and add their own bound.
    h = Assumptions(Guarantee.DATASET, 0.95, delta=0.05, human_error=0.02, n_classes=4)
    careful = certify(ledger, tally, h)
    assert careful.auto_errors_upper > disagreement_upper(ledger, h.deltas()[0]) > upper
    assert careful.human_errors_upper == pytest.approx(binomial_upper(tally.human, 0.02, h.deltas()[2]))
    assert careful.lower_bound < dataset.lower_bound
    assert careful.human_error == 0.02 and careful.delta == 0.05


def test_wilson_lower_bound() -> None:
    assert wilson_lower_bound(0, 0, 1.645) == 0.0
    # Known value: 95/100 at z=1.96 -> 0.8882.
    assert wilson_lower_bound(95, 100, 1.96) == pytest.approx(0.88825, abs=1e-4)
    assert wilson_lower_bound(100, 100, 1.645) == pytest.approx(1 / (1 + 1.645**2 / 100), abs=1e-9)
    assert wilson_lower_bound(50, 100, 0.0) == pytest.approx(0.5)
    assert wilson_lower_bound(10, 10, 1.645) < wilson_lower_bound(100, 100, 1.645)
    with pytest.raises(ValueError):
        wilson_lower_bound(3, 2, 1.0)


# -- acceptance: ProposalBook -------------------------------------------------------------------


def _propose(book: ProposalBook, batch: int, n: int, pi: float, seed: int) -> list[Entry]:
    """A batch of n proposals of label 0, audited with probability pi (a seeded draw)."""
    audited = np.random.default_rng(seed).random(n) < pi
    entries = [Entry(f"b{batch}-{i}", batch, 0, pi, bool(audited[i])) for i in range(n)]
    for e in entries:
        book.add(e)
    return entries


def _answer_audits(book: ProposalBook, entries: list[Entry], disagree: int = 0) -> None:
    """People label every audit: the first `disagree` of them disagree, and so does the second person."""
    for i, e in enumerate(x for x in entries if x.audited):
        if book.record_label(e.item_id, 1 if i < disagree else 0):
            book.record_second_opinion(e.item_id, 1)


def _clean_lower_bound(entries: list[Entry], delta: float) -> float:
    """The automatic guarantee's certificate for this batch alone, accepted, with no disagreement."""
    audited = np.array([e.audited for e in entries])
    upper = disagreement_upper(
        Ledger(np.array([e.audit_prob for e in entries]), audited, np.zeros(len(entries))), delta
    )
    return 1.0 - min(upper, float((~audited).sum())) / float((~audited).sum())


@pytest.mark.parametrize("margin", [-0.005, 0.005])
def test_settle_accepts_a_batch_only_when_the_certificate_counting_it_as_automatic_is_met(
    margin: float,
) -> None:
    n = 1000
    probe = _propose(ProposalBook(Assumptions(Guarantee.AUTOMATIC, 0.9)), 1, n, 0.2, seed=1)
    target = _clean_lower_bound(probe, 0.05) + margin  # about 0.96
    book = ProposalBook(Assumptions(Guarantee.AUTOMATIC, target))
    entries = _propose(book, 1, n, 0.2, seed=1)
    _answer_audits(book, entries)
    slipped = sum(not e.audited for e in entries)
    # Before: no automatic label, every item still counted as a future human label.
    accepted, rejected = book.settle(Tally(items=n, auto=0, human=n, model=0), n_labels=200)
    if margin < 0:
        assert (accepted, rejected) == ([1], []) and book.batch_state[1] == ACCEPTED
        cert = book.certificate(Tally(items=n, auto=slipped, human=n - slipped, model=0))
        assert cert.met and cert.lower_bound == pytest.approx(target - margin)
    else:
        # All its audits are in and agree, yet the batch does not fit: handed back to people.
        assert (accepted, rejected) == ([], [1]) and book.batch_state[1] == REJECTED
        assert book.rejected_at[1] == 200


def test_a_dataset_target_accepts_what_the_automatic_one_refuses() -> None:
    n = 1000
    for guarantee, items, expected in (
        (Guarantee.AUTOMATIC, n, REJECTED),
        (Guarantee.DATASET, 20 * n, ACCEPTED),
    ):
        book = ProposalBook(Assumptions(guarantee, 0.99))
        _answer_audits(book, _propose(book, 1, n, 0.2, seed=1))
        book.settle(Tally(items=items, auto=0, human=items, model=0))
        assert book.batch_state[1] == expected


def test_a_batch_waits_for_its_audits_and_is_handed_back_when_they_refute_it() -> None:
    # A dataset target that leaves room for every item of the batch being wrong: the certificate
    # alone would accept it, the batch's own audits must not.
    tally = Tally(items=10_000, auto=0, human=10_000, model=0)

    def batch() -> tuple[ProposalBook, list[Entry]]:
        book = ProposalBook(Assumptions(Guarantee.DATASET, 0.95))
        entries = _propose(book, 1, 400, 0.1, seed=2)
        book.proposed_at[1] = 0
        return book, [e for e in entries if e.audited]

    book, audits = batch()
    assert len(audits) >= 30
    # Every audit but one is in: the batch waits, whatever the certificate says.
    _answer_audits(book, audits[:-1])
    assert (
        book.settle(tally, n_labels=50) == ([], []) and book.batch_state[1] == PENDING and book.has_pending()
    )
    _answer_audits(book, audits[-1:])
    assert book.settle(tally, n_labels=51) == ([1], []) and not book.has_pending()

    # Eight disagreements in about 40 audits: even the lower bound of their rate is above the 5%
    # the target allows: refuted, though the certificate would hold.
    book, audits = batch()
    _answer_audits(book, audits, disagree=8)
    trial = Tally(items=10_000, auto=400 - len(audits), human=10_000, model=0)
    assert book.certificate(trial).met
    assert book.settle(tally, n_labels=50) == ([], [1]) and book.rejected_at[1] == 50

    # One disagreement (10 in 400) passes, even before its second opinion is in...
    book, audits = batch()
    assert book.record_label(audits[0].item_id, 1)
    _answer_audits(book, audits[1:])
    assert book.settle(tally, n_labels=50) == ([1], [])
    # ...eight awaiting theirs do not: the batch waits for the second people,
    book, audits = batch()
    for e in audits[:8]:
        assert book.record_label(e.item_id, 1)
    _answer_audits(book, audits[8:])
    assert book.settle(tally, n_labels=50) == ([], []) and book.batch_state[1] == PENDING
    # is accepted when they side with the model,
    for e in audits[:8]:
        book.record_second_opinion(e.item_id, 0)
    assert book.settle(tally, n_labels=60) == ([1], [])
    # and handed back when they do not come before patience runs out.
    book, audits = batch()
    for e in audits[:8]:
        book.record_label(e.item_id, 1)
    _answer_audits(book, audits[8:])
    assert book.settle(tally, n_labels=10_000) == ([], [1])


def test_the_certificate_of_accepted_labels_does_not_fall_while_nothing_is_accepted() -> None:
    probe = _propose(ProposalBook(Assumptions(Guarantee.AUTOMATIC, 0.9)), 1, 1000, 0.1, seed=4)
    target = _clean_lower_bound(probe, 0.05) - 0.005
    book = ProposalBook(Assumptions(Guarantee.AUTOMATIC, target))
    first = _propose(book, 1, 1000, 0.1, seed=4)
    _answer_audits(book, first)
    assert book.settle(Tally(items=3000, auto=0, human=3000, model=0)) == ([1], [])
    slipped = sum(not e.audited for e in first)
    tally = Tally(items=3000, auto=slipped, human=3000 - slipped, model=0)
    assert book.certificate(tally).met
    second = _propose(book, 2, 1000, 0.1, seed=5)
    assert book.certificate(tally).met  # its audits pending
    _answer_audits(book, second, disagree=10)
    assert book.settle(tally) == ([], [2])
    assert book.certificate(tally).met  # refuted and handed back


def test_audit_labels_are_adjudicated_by_a_second_person() -> None:
    book = ProposalBook(Assumptions(Guarantee.AUTOMATIC, 0.9, human_error=0.05, n_classes=3))
    entries = _propose(book, 1, 60, 0.5, seed=3)
    audits = [e for e in entries if e.audited]
    unaudited = [e for e in entries if not e.audited]
    a, b, c = audits[:3]
    # An audit that agrees settles at once.
    assert not book.record_label(a.item_id, 0)
    assert a.disagreed is False
    # One that disagrees asks for a second opinion (once) and stays pending: it weighs as a disagreement.
    assert book.record_label(b.item_id, 2) and b.adjudicating and b.disagreed is None
    assert not book.record_label(b.item_id, 2)
    row = book.index[b.item_id]
    assert book.ledger().disagreed[row] == 1.0
    # The second person sides with the model: no disagreement after all.
    book.record_second_opinion(b.item_id, 0)
    assert b.disagreed is False and book.ledger().disagreed[row] == 0.0
    # Or with the first person: the disagreement stands.
    assert book.record_label(c.item_id, 1)
    book.record_second_opinion(c.item_id, 2)  # any label but the model's
    assert c.disagreed is True and book.ledger().disagreed[book.index[c.item_id]] == 1.0
    book.record_second_opinion(c.item_id, 0)  # settled: a late opinion changes nothing
    assert c.disagreed is True
    assert book.audits() == (3, 1)
    # A label on an item that was not audited (handed back to people) is settled the same way:
    # one that agrees at once, one that disagrees by a second person.
    d, e = unaudited[:2]
    assert not book.record_label(e.item_id, 0) and e.disagreed is False and not e.adjudicating
    assert book.record_label(d.item_id, 1) and d.adjudicating and d.disagreed is None
    assert book.ledger().known is not None and not book.ledger().known[book.index[d.item_id]]
    book.record_second_opinion(d.item_id, 1)
    assert d.disagreed is True and book.ledger().known[book.index[d.item_id]]
    # Items never proposed are none of the book's business.
    assert not book.record_label("elsewhere", 1)
    book.record_second_opinion("elsewhere", 1)
    assert book.audits() == (3, 1)


def test_pending_audits_count_as_disagreements() -> None:
    def bound(answer: int | None) -> float:
        """Bound on the accepted batch 1 while batch 2 waits, its audits unanswered (None), or
        answered with that many disagreements."""
        book = ProposalBook(Assumptions(Guarantee.AUTOMATIC, 0.5))
        first = _propose(book, 1, 1000, 0.1, seed=4)
        _answer_audits(book, first)
        assert book.settle(Tally(items=3000, auto=0, human=3000, model=0)) == ([1], [])
        second = _propose(book, 2, 300, 0.1, seed=5)
        if answer is not None:
            _answer_audits(book, second, disagree=answer)
        assert book.batch_state[2] == PENDING
        slipped = sum(not e.audited for e in first)
        # The sequence's own bound (the certificate keeps the one the acceptance rested on).
        return book._trial_certificate(
            Tally(items=3000, auto=slipped, human=3000 - slipped, model=0)
        ).auto_errors_upper

    audits = sum(
        e.audited for e in _propose(ProposalBook(Assumptions(Guarantee.AUTOMATIC, 0.5)), 2, 300, 0.1, 5)
    )
    pending = bound(None)
    assert bound(0) < bound(2) < pending
    assert bound(audits) == pytest.approx(pending)


def test_labels_on_handed_back_items_lower_the_bound() -> None:
    book = ProposalBook(Assumptions(Guarantee.DATASET, 0.95))
    first = _propose(book, 1, 1000, 0.1, seed=4)
    _answer_audits(book, first)
    assert book.settle(Tally(items=20_000, auto=0, human=20_000, model=0)) == ([1], [])
    slipped = sum(not e.audited for e in first)
    tally = Tally(items=20_000, auto=slipped, human=20_000 - slipped, model=0)
    alone = book.certificate(tally).auto_errors_upper

    second = _propose(book, 2, 1000, 0.1, seed=5)
    _answer_audits(book, second, disagree=10)
    assert book.settle(tally) == ([], [2])
    # The refuted batch's audited disagreements weigh on the sequence's bound (the certificate
    # keeps the smaller bound seen before, valid as well: see the test above)...
    refuted = book._trial_certificate(tally).auto_errors_upper
    assert refuted > alone + 50
    assert book.certificate(tally).auto_errors_upper == pytest.approx(alone)
    # ...until people label its items: the disagreements they find pay that back.
    handed_back = [e for e in second if not e.audited]
    for e in handed_back[:100]:
        assert book.record_label(e.item_id, 1)
    # (not before a second person confirms them)
    assert book._trial_certificate(tally).auto_errors_upper == pytest.approx(refuted)
    for e in handed_back[:100]:
        book.record_second_opinion(e.item_id, 1)
    some = book._trial_certificate(tally).auto_errors_upper
    assert alone <= some < refuted - 50
    # Agreeing labels reveal nothing: the bound stays where it is.
    for e in handed_back[100:]:
        book.record_label(e.item_id, 0)
    assert book._trial_certificate(tally).auto_errors_upper == pytest.approx(some)


def test_plan_proposes_the_most_confident_prefix() -> None:
    rng = np.random.default_rng(6)
    conf = 1.0 - rng.uniform(0.0, 0.2, size=3000)
    book = ProposalBook(Assumptions(Guarantee.DATASET, 0.97))
    plan = book.plan(conf, Tally(items=10_000, auto=0, human=10_000, model=0), floor=0.05, max_items=3000)
    assert plan is not None and 10 <= len(plan.rows) < 3000
    assert plan.rows.tolist() == np.argsort(-conf, kind="stable")[: len(plan.rows)].tolist()
    # Audit probabilities follow the expected disagreement, never below the floor.
    q = np.maximum(1.0 - conf[plan.rows], PLANNING_FLOOR * book.disagreement_rate())
    np.testing.assert_allclose(plan.audit_prob, audit_probability(q, 0.05))
    assert plan.predicted_lower_bound >= 0.97
    # No room for more than a handful: no proposal.
    assert book.plan(conf, Tally(10_000, 0, 10_000, 0), floor=0.05, max_items=5) is None
    assert book.plan(np.zeros(0), Tally(10_000, 0, 10_000, 0), floor=0.05, max_items=100) is None


def test_plan_sizes_grow_with_confidence_and_vanish_when_nothing_fits() -> None:
    tally = Tally(items=10_000, auto=0, human=10_000, model=0)
    dataset = ProposalBook(Assumptions(Guarantee.DATASET, 0.97))
    sizes = []
    for c in (0.971, 0.98, 0.99, 0.998):
        plan = dataset.plan(np.full(5000, c), tally, floor=0.05, max_items=5000)
        assert plan is not None
        sizes.append(len(plan.rows))
    assert all(b >= a for a, b in itertools.pairwise(sizes)) and sizes[-1] > 1.5 * sizes[0], sizes
    # Items the model thinks likelier wrong than the target allows per item are proposed only as
    # far as the target's room allows them in expectation: 0.03 * 10,000 / 0.1 = 3,000 at most.
    loose = dataset.plan(np.full(5000, 0.9), tally, floor=0.05, max_items=5000)
    assert loose is None or len(loose.rows) <= 3000
    assert dataset.plan(np.full(5000, 0.5), tally, floor=0.05, max_items=5000) is None
    automatic = ProposalBook(Assumptions(Guarantee.AUTOMATIC, 0.9))
    assert automatic.plan(np.full(5000, 0.8), tally, floor=0.05, max_items=5000) is None
    assert automatic.plan(np.full(5000, 0.99), tally, floor=0.05, max_items=5000) is not None


# -- acceptance end to end: ProjectModel --------------------------------------------------------


def _unit(m: np.ndarray) -> np.ndarray:
    out: np.ndarray = (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)
    return out


def _confusing_world(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(label embeddings, feature rows, true labels, region): 4 classes, class 1 the most common.
    The region (10% of the items) is of class 0, but its embeddings lie in class 1's cluster and the
    labeler's zero-shot says class 1 with confidence: the model is confidently wrong there."""
    rng = np.random.default_rng(seed)
    k, d = 4, 32
    centers = _unit(rng.normal(size=(k, d)))
    y = rng.choice([1, 2, 3], size=n, p=[0.8, 0.1, 0.1])
    region = rng.random(n) < 0.1
    y[region] = 0
    looks_like = np.where(region, 1, y)
    emb = _unit(centers[looks_like] + 0.5 * rng.normal(size=(n, d)) / np.sqrt(d))
    return centers, features(emb, softmax(emb @ centers.T, 0.1)), y, region


def test_project_model_never_certifies_more_than_the_truth_in_a_confusing_world() -> None:
    n, target = 800, 0.95
    centers, X, y, region = _confusing_world(n, seed=0)
    spec = ProjectSpec("p", "p", tuple(LabelSpec(c, c) for c in "abcd"), "", target, 0.0, guarantee="dataset")
    model = ProjectModel(spec, centers, LRPolicyConfig(min_human_labels=40))
    ids = [f"i{i}" for i in range(n)]
    model.seen = n
    state = np.zeros(n, dtype=int)  # 0 waiting, 1 labeled by people, 2 accepted automatically
    final = np.full(n, -1)
    _, _, priority = model.decide(X, ids)
    priority = priority.copy()
    audits: set[str] = set()
    proposed_wrong = warm_ups = 0
    while (state == 0).any():
        waiting = np.flatnonzero(state == 0)
        # People label audits first, then by priority (10 at a time in the warm-up, then 40); they
        # never err here.
        per_round = 10 if model.n_labels < 40 else 40
        order = sorted(waiting, key=lambda i: -(2.0 if ids[i] in audits else priority[i]))[:per_round]
        for item_id, _ in model.add_labels(X[order], y[order], [ids[i] for i in order]):
            model.record_second_opinion(item_id, int(y[int(item_id[1:])]))
        state[order], final[order] = 1, y[order]
        model.refit()
        waiting = np.flatnonzero(state == 0)
        out = model.rescore(X[waiting], [ids[i] for i in waiting], priority[waiting])
        if model.n_labels < 40:
            warm_ups += 1
            assert not out.proposed and not out.accept and not model.book.entries
        for row, p in out.reprioritize:
            priority[waiting[row]] = p
        for e in out.proposed:
            audits.update([e.item_id] if e.audited else [])
            proposed_wrong += e.label != y[int(e.item_id[1:])]
        for accepted in out.accept:
            i = int(accepted[0][1:])
            assert state[i] == 0
            state[i], final[i] = 2, accepted[1]
        cert = model.certificate()
        if out.accept:
            assert cert.met  # every acceptance keeps the certificate at the target
        # Items nobody decided yet will be labeled right: the truth the certificate bounds.
        true_accuracy = 1.0 - float(((state == 2) & (final != y)).sum()) / n
        assert cert.lower_bound <= true_accuracy
    auto = state == 2
    assert warm_ups == 3
    assert proposed_wrong > 5  # the model did propose wrong labels...
    assert auto.sum() > 20  # ...and some of its labels were accepted,
    # ...but few of the region's, where every model label is wrong (measured: 2 of its 94).
    assert ((auto & region) & (final != y)).sum() <= 0.1 * region.sum()
    assert (final == y).mean() >= target
