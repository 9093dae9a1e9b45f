"""Certification: an anytime-valid bound on the wrong labels among what the model labeled alone.

Pure numpy, no I/O. The policy proposes items for automatic acceptance in batches. Each proposed
item i is sent to people as an *audit* with a probability pi_i fixed before its draw (higher where an
error is likelier, never zero); the others are accepted with their batch once the certificate
allows it, or handed back to people. d_i = 1 when
the model's proposed label disagrees with the (actual or would-be) human label. The quantity to bound
is S = sum of d_i over the unaudited items of accepted batches: the disagreements that slipped into
the dataset unseen.

The bound is a confidence sequence (valid at every moment of the run at once, Ville's inequality),
built from one test martingale per bet size gamma_j and mixed with equal weights:

    per item:  E[exp(lambda d (1 - A/pi))] = exp(d phi(lambda)),   A ~ Bernoulli(pi)

so with g(lambda) = lambda - phi(lambda) = -log(1 - pi (1 - exp(-lambda/pi))) > 0 the factor
exp(d (1-A) g - d A (lambda/pi - g)) has mean one whatever d is. lambda is chosen per item so that
g = gamma_j exactly (an unaudited disagreement always earns gamma_j); an audited disagreement then
costs c_ij = -log(1 - (1 - exp(-gamma_j))/pi_i) - gamma_j, about (1 - pi)/pi times gamma_j: the
inverse-probability weight (Zrnic & Candès 2024, active statistical inference). Products over items
are test martingales for any predictable choice of pi (Waudby-Smith & Ramdas, estimating means of
bounded random variables by betting), so acceptances can be made in batches as evidence arrives,
stay final, and the bound holds over the whole run. With probability at least 1 - delta, at every
moment:

    sum_j w_j exp(S Gamma_j - B_j) < 1/delta,   B_j = sum over audited disagreements of c_ij

and the upper bound on S is the largest S meeting it. Pending audits count as disagreements until
their label arrives (B only grows with them, so this only makes the bound larger).

People err too, at an assumed rate h (wrong labels spread over the other k-1 classes). A human
label on a proposed item (an audit, or an item handed back to people) that disagrees with the
model goes to a second person; the disagreement stands unless the second person sides with the
model, so d_i is a model error but for people erring twice, and it is the same quantity whether the
draw audited the item or not (the factor's mean stays one). Errors hidden by a first or second
person who picks the same wrong label (rate 1 - (1 - h/(k-1))^2) are added back as an upper
binomial bound, and human labels in the dataset count as wrong at rate h (an upper binomial
bound), unless people label blind (the project hides suggestions): then each person's label is
checked against the model's label fixed before it (HumanChecks), every disagreement goes to a
second person, and people's errors are bounded from what the checks saw (human_errors_upper).
h = 0 takes every human label as right; the certificate states the assumption it rests on.

The dataset guarantee (Candès, Ilyas & Zrnic 2025, probably approximately correct labels) is on
the whole dataset: (automatic errors + human errors + unchecked model labels) / items. The
automatic one is on the automatic labels alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from scipy.stats import binom

# Bet sizes of the mixture, log-spaced: small bets win when many audits disagree, large ones when
# none do. Fixed in advance (a data-chosen grid would not be a valid mixture).
GAMMAS = np.geomspace(1e-4, 2.0, 48)
# A bet may take at most this share of an item's largest possible gain -log(1 - pi): at the cap the
# cost of an audited disagreement grows without bound.
_CAP_SHARE = 0.9


class Guarantee(StrEnum):
    # The final dataset (human and automatic labels together) is at least the target.
    DATASET = "dataset"
    # The automatic labels alone are at least the target.
    AUTOMATIC = "automatic"


# Where a proposed item's batch stands.
PENDING_BATCH, ACCEPTED_BATCH, REJECTED_BATCH = 0, 1, 2


@dataclass(frozen=True)
class Ledger:
    """Every item proposed for automatic acceptance so far (arrays of one row per item).

    Without `state` every item counts as accepted (the plain sequence over all proposals)."""

    audit_prob: np.ndarray  # pi_i, fixed before the draw
    audited: np.ndarray  # bool: the draw sent it to people
    # Disagreement in [0, 1]. Audited rows: 1 or 0 once settled, 1 while pending (a planning
    # caller may pass an expected value instead). Unaudited rows: 1 or 0 where `known`.
    disagreed: np.ndarray
    known: np.ndarray | None = None  # unaudited rows whose disagreement people's label revealed
    batch: np.ndarray | None = None  # batch number per row
    state: np.ndarray | None = None  # PENDING_BATCH / ACCEPTED_BATCH / REJECTED_BATCH per row

    @staticmethod
    def empty() -> Ledger:
        return Ledger(np.zeros(0), np.zeros(0, dtype=bool), np.zeros(0))

    def knowns(self) -> np.ndarray:
        return np.zeros(len(self.audit_prob), dtype=bool) if self.known is None else self.known

    def batches(self) -> np.ndarray:
        return np.zeros(len(self.audit_prob), dtype=np.int64) if self.batch is None else self.batch

    def states(self) -> np.ndarray:
        n = len(self.audit_prob)
        return np.full(n, ACCEPTED_BATCH, dtype=np.int8) if self.state is None else self.state


def _bets(audit_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per item and bet size: the bet gamma_ij = min(gamma_j, share of the item's cap), fixed by the
    item's own pi before its draw, and the cost c_ij of an audited disagreement under it."""
    pi = np.clip(np.asarray(audit_prob, dtype=np.float64), 1e-9, 1.0)
    # Items audited with certainty can never slip through: they take no part in the bet.
    uncertain = pi < 1.0
    cap = np.where(uncertain, -np.log1p(-np.minimum(pi, 1.0 - 1e-12)), np.inf)
    gamma_ij = np.minimum(GAMMAS[None, :], _CAP_SHARE * cap[:, None])  # (n, J)
    # c = -log(1 - (1 - e^-gamma) / pi) - gamma, computed stably; below the cap ratio < 1.
    ratio = -np.expm1(-gamma_ij) / pi[:, None]
    cost = -np.log1p(-np.minimum(ratio, 1.0 - 1e-12)) - gamma_ij
    cost[~uncertain] = 0.0
    gamma_ij[~uncertain] = 0.0
    return gamma_ij, cost


def _log_factors(ledger: Ledger) -> tuple[np.ndarray, np.ndarray]:
    """(Gamma_j, offset_j): a lower bound on each bet's log-wealth is S * Gamma_j + offset_j, S the
    disagreements among unaudited items of accepted batches.

    Accepted batches: every unaudited disagreement earns at least Gamma_j (the smallest bet among
    their items), every audited one costs c_ij. Pending batches: their unaudited items' unknown
    disagreements can only add, so only their audits' costs count. Rejected batches count with
    min(0, their log-wealth): that is below the true factor whatever made the batch rejected, so
    the mixture stays below a test martingale (Ville's inequality still applies), and a batch the
    audits refuted costs next to nothing once people have labeled it: its unaudited items'
    disagreements, settled as an audit's are (a second person where the first disagrees), earn
    what its audited ones cost, in expectation. A disagreement still waiting for its second opinion
    earns nothing yet."""
    gamma_ij, cost = _bets(ledger.audit_prob)
    audited = np.asarray(ledger.audited, dtype=bool)
    d = np.asarray(ledger.disagreed, dtype=np.float64)
    known = ledger.knowns()
    states = ledger.states()
    accepted = states == ACCEPTED_BATCH
    rejected = states == REJECTED_BATCH
    slipping = accepted & ~audited & (np.asarray(ledger.audit_prob) < 1.0)
    gamma = gamma_ij[slipping].min(axis=0) if slipping.any() else GAMMAS.copy()
    paid = audited & ~rejected
    offset = -(d[paid, None] * cost[paid]).sum(axis=0)
    if rejected.any():
        batches = ledger.batches()
        handed_back = np.unique(batches[rejected]).tolist()
        for b in handed_back:
            rows = rejected & (batches == b)
            labeled = rows & ~audited & known
            paid_b = (d[rows & audited, None] * cost[rows & audited]).sum(axis=0)
            earned = (d[labeled, None] * gamma_ij[labeled]).sum(axis=0)
            offset = offset + np.minimum(earned - paid_b, 0.0)
    return gamma, offset


def disagreement_upper(ledger: Ledger, delta: float) -> float:
    """Upper confidence bound on the disagreements among unaudited items of accepted batches
    (valid at every moment of the run at once, with probability at least 1 - delta)."""
    gamma, offset = _log_factors(ledger)
    states = ledger.states()
    slipping = float(((states == ACCEPTED_BATCH) & ~np.asarray(ledger.audited, dtype=bool)).sum())
    return mixture_upper(gamma, -offset, slipping, delta)


def planned_upper(
    ledger: Ledger,
    audit_prob: np.ndarray,
    disagree_prob: np.ndarray,
    delta: float,
) -> float:
    """The bound expected once a batch of items with these audit and disagreement probabilities is
    proposed, its audits are in and it is accepted (for sizing a proposal only: the certificate
    itself always comes from the draws and labels that happened)."""
    pi = np.asarray(audit_prob, dtype=np.float64)
    q = np.asarray(disagree_prob, dtype=np.float64)
    # Expected values stand in for the new rows: every row "audited" with weight pi * q, and
    # (1 - pi) of each row slipping through unaudited.
    gamma_ij, cost = _bets(pi)
    gamma, offset = _log_factors(ledger)
    if len(pi):
        gamma = np.minimum(gamma, gamma_ij[pi < 1.0].min(axis=0)) if (pi < 1.0).any() else gamma
        offset = offset - ((pi * q)[:, None] * cost).sum(axis=0)
    states = ledger.states()
    slipping = float(((states == ACCEPTED_BATCH) & ~np.asarray(ledger.audited, dtype=bool)).sum())
    return mixture_upper(gamma, -offset, slipping + float((1.0 - pi).sum()), delta)


def mixture_upper(gamma: np.ndarray, b: np.ndarray, unaudited: float, delta: float) -> float:
    """Largest S with sum_j w_j exp(S gamma_j - b_j) < 1/delta (equal weights), at most `unaudited`."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if unaudited <= 0:
        return 0.0
    log_w = -math.log(len(gamma))
    limit = math.log(1.0 / delta)

    def log_mixture(s: float) -> float:
        z = log_w + s * gamma - b
        top = float(z.max())
        return top + math.log(float(np.exp(z - top).sum()))

    if log_mixture(unaudited) < limit:
        return float(unaudited)
    lo, hi = 0.0, float(unaudited)
    if log_mixture(lo) >= limit:
        return 0.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if log_mixture(mid) < limit:
            lo = mid
        else:
            hi = mid
    return lo


def binomial_upper(n: float, rate: float, delta: float) -> float:
    """Upper bound on Binomial(n, rate) with probability 1 - delta: its exact 1 - delta quantile
    (P(X > bound) <= delta), for a fractional n that of ceil(n) trials, which can only be larger.
    Exact rather than Chernoff's form: ~60 expected human errors get a bound of 79 instead of 85,
    room the target then leaves to automatic labels. Rises by at most one per trial added, so
    n - binomial_upper(n) never falls as n grows (error_bounds relies on it)."""
    if n <= 0 or rate <= 0:
        return 0.0
    trials = math.ceil(n)
    return float(min(binom.ppf(1.0 - delta, trials, min(rate, 1.0)), trials))


@dataclass(frozen=True)
class Assumptions:
    guarantee: Guarantee
    target: float
    delta: float = 0.05
    # Assumed rate at which people pick a wrong label (spread over the other classes).
    human_error: float = 0.0
    n_classes: int = 2
    # People label blind (no suggestion shown), so their errors are independent of the model's
    # label and a label that agrees with it is wrong only where both are (human_errors_upper).
    blind: bool = False

    def deltas(self) -> tuple[float, float, float]:
        """delta split between the confidence sequence, the errors people's agreement hides and the
        human labels' own errors (all of it to the sequence when people are taken as right)."""
        if self.human_error <= 0:
            return self.delta, 0.0, 0.0
        return self.delta * 0.6, self.delta * 0.2, self.delta * 0.2

    def human_deltas(self) -> tuple[float, float, float, float]:
        """The human labels' share of delta in a blind project: half to counting every label at h,
        the other half split between the errors hidden by agreeing with the model, those a second
        person confirms, and the unchecked labels (the smaller of the two bounds stands)."""
        d = self.deltas()[2]
        return d / 2.0, d / 6.0, d / 6.0, d / 6.0

    @property
    def agrees_with_wrong(self) -> float:
        """Chance that one person picks one given wrong label: h / (k - 1)."""
        return self.human_error / max(self.n_classes - 1, 1)

    @property
    def agree_when_wrong(self) -> float:
        """Chance that people hide a model error: the first person picks the model's wrong label
        too, or disagrees and the second person picks it (each at rate h/(k-1), errors spread over
        the k-1 other classes)."""
        a = self.human_error / max(self.n_classes - 1, 1)
        return 1.0 - (1.0 - a) ** 2


@dataclass(frozen=True)
class HumanChecks:
    """People's labels given so far, by what checking them against the model showed (blind
    projects; see human_checks.py). A label is checked when it is one person's label, given blind,
    on an item whose model label was fixed before it; every other label is `plain`."""

    agreed: int = 0  # checked, and the person picked the model's label
    disagreed: int = 0  # checked, and they did not (each goes to a second person)
    seconded: int = 0  # of the disagreements, those whose second label is in
    split: int = 0  # ... of which the second person picked neither label (counted wrong)
    plain: int = 0  # not checked: wrong at rate h
    # The latest labels' checks (RECENT_SHARE of them), for projecting the labels still to come.
    recent: HumanChecks | None = None

    @property
    def given(self) -> int:
        return self.agreed + self.disagreed + self.plain

    def like_ahead(self) -> HumanChecks:
        """The labels whose checks the ones still to come are projected like: all so far, or the
        latest where they disagree with the model more often. Whether later labels disagree more or
        less depends on the pool: where the model starts weak (SMS Spam) its early labels disagree
        most; where it certifies the easy items first, people are left the hard ones (AG News,
        CLINC150: a certificate projected from all labels fell from 0.9804 to 0.9791 under a 0.98
        target as the last 500 came in)."""
        r = self.recent
        if r is None or not r.given or r.disagreed * self.given <= self.disagreed * r.given:
            return self
        return r


@dataclass(frozen=True)
class Tally:
    """Where the project's items stand."""

    items: int  # every item of the project the scorer has decided
    auto: int  # accepted automatically (never audited)
    human: int  # labeled by people (audits included), and items still to be labeled by them
    model: int  # finalized with an unchecked model label (budget spent)
    checks: HumanChecks = HumanChecks()  # the human labels given so far, by their checks


@dataclass(frozen=True)
class Certificate:
    guarantee: Guarantee
    target: float
    delta: float
    human_error: float
    tally: Tally
    auto_errors_upper: float  # wrong automatic labels, upper bound
    human_errors_upper: float  # wrong human labels, upper bound (0 when people are taken as right)

    @property
    def lower_bound(self) -> float:
        """Certified accuracy (dataset, or automatic labels alone), valid with probability 1 - delta."""
        t = self.tally
        return lower_bound(
            self.guarantee, self.auto_errors_upper, self.human_errors_upper, t.items, t.auto, t.model
        )

    @property
    def met(self) -> bool:
        return self.lower_bound >= self.target


def _errors_hiding(shown: float, most: float, rate: float, delta: float) -> float:
    """Upper bound on E, the errors among `most` items each hidden independently at `rate`, when
    `shown` of them showed: E - hidden <= shown and hidden <= binomial_upper(E) but with probability
    delta, so E is at most the largest x with x <= shown + binomial_upper(x) (x minus the right side
    is convex: the set is an interval from `shown` up)."""

    def fits(x: float) -> bool:
        return x <= shown + binomial_upper(x, rate, delta)

    if fits(most):
        return most
    lo, hi = shown, most
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return hi


# Checked labels needed before the labels still to come are projected from them...
MIN_CHECKED = 50
# ...and the latest labels, this share of them (at least MIN_CHECKED), are HumanChecks.recent.
RECENT_SHARE = 0.25


def human_errors_upper(
    human: float, checks: HumanChecks, assumptions: Assumptions, slack_ahead: bool = True
) -> float:
    """Upper bound on the wrong labels among `human` (given and still to come), with probability
    at least 1 - the human share of delta.

    Without blind labeling every human label is wrong at rate h (an upper binomial bound). With it,
    a person's label is checked against the model's label m fixed before it (people err at h,
    uniformly over the other k - 1 classes, independently of m: they never see it):
    - a label that agrees with m is wrong only where m is and the person picked that same wrong
      label (chance a = h / (k - 1) per model error): the model's errors among checked items are
      at most the disagreements plus those hidden ones, which bounds the hidden ones;
    - a disagreement goes to a second person: the final label is the one two of the three (first,
      second, model) share, wrong only if the second person picked a wrong one of the two (at most
      a per item, 2a where both may be wrong, k > 2); a second label with neither, or none yet,
      counts as wrong;
    - unchecked labels count at h.
    The smaller of that and every label counted at h stands (each at half the delta).

    Labels still to come are projected (once everything is labeled there are none), and so are the
    second labels still out: counted as wrong, they blocked every acceptance while people worked
    through them (CLINC150 at 0.95 through the services: 74% human). An acceptance counts the
    labels to come as checked the way the given ones were, or the latest ones where those disagree
    more (HumanChecks.like_ahead; every disagreement seconded in the end, split as often as so far),
    and takes the bound on the whole: it counts on the slack the final bound will have, not only on
    the expected rate (which left AG News 0.0003 short of certified through the services).
    Planning (`slack_ahead=False`) adds them at the rate the checks suggest (human_error_estimate):
    all of the undecided items count as future human labels, though most end up automatic, and
    their slack made SMS Spam at 0.98 plan batches of a third the size (0.62-0.64 human instead of
    0.33-0.37, offline). Before MIN_CHECKED labels are checked, every label counts at h.
    """
    h = assumptions.human_error
    if h <= 0 or human <= 0:
        return 0.0
    given = checks.given
    if not assumptions.blind or given == 0 or (given < MIN_CHECKED and human > given):
        return binomial_upper(round(human), h, assumptions.deltas()[2])
    if human <= given:
        return _checked_upper(
            checks.agreed, checks.disagreed, checks.seconded, checks.split, checks.plain, assumptions
        )
    # A projection: every disagreement, those still waiting for their second label included, ends
    # seconded, split as often as so far.
    split_rate = checks.split / checks.seconded if checks.seconded else 0.0
    # With the slack ahead: the labels to come checked like the given ones (HumanChecks.like_ahead);
    # without: the given ones, the rest added at the expected rate.
    like, grow = checks, 0.0
    if slack_ahead:
        like = checks.like_ahead()
        grow = (human - given) / like.given
    disagreed = checks.disagreed + like.disagreed * grow
    projected = _checked_upper(
        agreed=checks.agreed + like.agreed * grow,
        disagreed=disagreed,
        seconded=disagreed,
        split=checks.split + split_rate * (disagreed - checks.seconded),
        plain=checks.plain + like.plain * grow,
        assumptions=assumptions,
    )
    if slack_ahead:
        return projected
    return projected + (human - given) * human_error_estimate(checks, assumptions)


def _checked_upper(
    agreed: float, disagreed: float, seconded: float, split: float, plain: float, assumptions: Assumptions
) -> float:
    """human_errors_upper on labels counted by their checks (projected counts may be fractional)."""
    h = assumptions.human_error
    d_all, d_agree, d_second, d_plain = assumptions.human_deltas()
    a = assumptions.agrees_with_wrong
    model_wrong = _errors_hiding(disagreed, agreed + disagreed, a, d_agree)
    hidden = binomial_upper(model_wrong, a, d_agree) if agreed else 0.0
    both = 2.0 * a if assumptions.n_classes > 2 else a
    counted = disagreed - seconded + split  # no second label yet, or neither
    checked = (
        min(hidden, agreed)
        + counted
        + binomial_upper(seconded, both, d_second)
        + binomial_upper(plain, h, d_plain)
    )
    # Where second opinions never come (one annotator), every disagreement counts as wrong: then
    # counting each label at h is the smaller bound.
    return min(checked, binomial_upper(agreed + disagreed + plain, h, d_all))


def human_error_estimate(checks: HumanChecks, assumptions: Assumptions) -> float:
    """The rate at which people's labels are expected to be wrong, for projecting the labels still
    to come and planning: the assumed h, or in a blind project with enough labels checked, what the
    checks suggest (about a per disagreement hidden behind an agreement, up to 2a per second
    opinion, the split ones, h per unchecked label) when lower. A point estimate, not a bound."""
    h = assumptions.human_error
    if not assumptions.blind or checks.given < MIN_CHECKED:
        return h
    a = assumptions.agrees_with_wrong
    both = 2.0 * a if assumptions.n_classes > 2 else a
    expected = (a + both) * checks.disagreed + checks.split + h * checks.plain
    return min(h, expected / checks.given)


def error_bounds(
    disagreements: float,
    auto: float,
    human: float,
    assumptions: Assumptions,
    checks: HumanChecks = HumanChecks(),
    slack_ahead: bool = True,
) -> tuple[float, float]:
    """(wrong automatic labels, wrong human labels), upper bounds, from an upper bound on the
    adjudicated disagreements among the automatic labels.

    An audit that disagrees with the model goes to a second person, so a disagreement that stands
    is a model error but for people erring twice (which only adds to the bound). A model error
    stays hidden when the first person picks the same wrong label, or the second one does
    (Assumptions.agree_when_wrong per error): the bound adds an upper bound on those.

    E errors show at least E - hidden disagreements (_errors_hiding). People's own errors:
    human_errors_upper."""
    _, d_hidden, _ = assumptions.deltas()
    disagreements = min(max(disagreements, 0.0), auto)
    if assumptions.human_error <= 0:
        return disagreements, 0.0
    errors = _errors_hiding(disagreements, float(auto), assumptions.agree_when_wrong, d_hidden)
    return errors, human_errors_upper(human, checks, assumptions, slack_ahead)


def lower_bound(
    guarantee: Guarantee, auto_errors: float, human_errors: float, items: float, auto: float, model: float
) -> float:
    """Certified accuracy of the dataset (or of the automatic labels alone)."""
    if guarantee is Guarantee.AUTOMATIC:
        return 1.0 - auto_errors / auto if auto > 0 else 1.0
    if items <= 0:
        return 1.0
    return max(0.0, 1.0 - (auto_errors + human_errors + model) / items)


def sequence_upper(ledger: Ledger, assumptions: Assumptions) -> float:
    """The confidence sequence's bound on disagreements among the accepted automatic labels."""
    return disagreement_upper(ledger, assumptions.deltas()[0])


def certify(
    ledger: Ledger, tally: Tally, assumptions: Assumptions, upper: float | None = None
) -> Certificate:
    """The certificate for the automatic labels in `tally` given the audits in `ledger`; `upper`
    replaces the sequence's bound (e.g. the smallest one seen while the accepted set stayed the same,
    valid since every bound of the sequence holds at once)."""
    if upper is None:
        upper = sequence_upper(ledger, assumptions)
    auto_errors, human_errors = error_bounds(upper, tally.auto, tally.human, assumptions, tally.checks)
    return Certificate(
        guarantee=assumptions.guarantee,
        target=assumptions.target,
        delta=assumptions.delta,
        human_error=assumptions.human_error,
        tally=tally,
        auto_errors_upper=auto_errors,
        human_errors_upper=human_errors,
    )


def wilson_lower_bound(successes: int, n: int, z: float) -> float:
    """Wilson score lower bound of a binomial proportion (0.0 for an empty sample): the interval
    shown beside the audits' plain agreement rate. The certificate does not rest on it."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return 0.0
    phat = successes / n
    z2 = z * z
    centre = phat + z2 / (2.0 * n)
    spread = z * math.sqrt(phat * (1.0 - phat) / n + z2 / (4.0 * n * n))
    return max(0.0, min(1.0, (centre - spread) / (1.0 + z2 / n)))
