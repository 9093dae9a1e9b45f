"""services/scorer/policy/proposals.py: the audit draw, audit probabilities and the book's
bookkeeping (acceptance itself is tested with the certificate, in test_certification.py)."""

from __future__ import annotations

import numpy as np
import pytest

from services.scorer.policy.certification import Assumptions, Guarantee, Tally
from services.scorer.policy.proposals import (
    ACCEPTED,
    ALLOCATION_STRETCH,
    AUDIT_BASE_RATE,
    AUDITS_PER_ROOM,
    MAX_AUDIT_SCALE,
    MIN_AUDIT_SCALE,
    PENDING,
    REJECTED,
    Entry,
    ProposalBook,
    audit_floor,
    audit_probability,
    unit_draw,
)


def test_unit_draw_is_stable_and_uniform() -> None:
    assert unit_draw("item-1") == unit_draw("item-1") == unit_draw("item-1", "audit")
    assert unit_draw("item-1", "order") != unit_draw("item-1", "audit")  # salts draw independently
    draws = np.array([unit_draw(str(i)) for i in range(4000)])
    assert draws.min() >= 0.0 and draws.max() < 1.0
    assert abs(draws.mean() - 0.5) < 0.02
    # Uniform across the whole range, not just on average: every tenth holds its share.
    counts = np.bincount((draws * 10).astype(int), minlength=10)
    assert counts.min() > 330 and counts.max() < 470
    other = np.array([unit_draw(str(i), "control") for i in range(4000)])
    assert abs(np.corrcoef(draws, other)[0, 1]) < 0.05


def test_audit_floor_is_the_projects_rate_or_sized_to_the_pool() -> None:
    assert audit_floor(0.1, 0.95, 1000) == 0.1
    assert audit_floor(2.0, 0.95, 1000) == 1.0
    # AUDITS_PER_ROOM audits per wrong label the target leaves room for: 20 / (0.05 * 8000).
    assert audit_floor(0.0, 0.95, 8000) == pytest.approx(AUDITS_PER_ROOM / 400)
    # People's own errors take part of that room: 20 / ((0.05 - 0.02) * 8000).
    assert audit_floor(0.0, 0.95, 8000, human_error=0.02) == pytest.approx(AUDITS_PER_ROOM / 240)
    # A pool 10x larger needs the same number of audits: a tenth of the share.
    assert audit_floor(0.0, 0.95, 40_000) == pytest.approx(audit_floor(0.0, 0.95, 4000) / 10)
    assert audit_floor(0.0, 0.95, 10) == 0.3  # never above 0.3...
    assert audit_floor(0.0, 0.99, 10**7) == 0.01  # ...nor below 0.01
    assert audit_floor(0.0, 0.95, 0) == 0.3


def test_audit_floor_follows_the_audits_disagreement_rate() -> None:
    base = AUDITS_PER_ROOM / 480  # 0.95 target, people at 2%, 16,000 items

    def floor(rate: float, items: int = 16_000, configured: float = 0.0) -> float:
        return audit_floor(configured, 0.95, items, 0.02, disagreement_rate=rate)

    assert floor(0.0) == pytest.approx(MIN_AUDIT_SCALE * base)  # audits that never disagree
    assert floor(0.8 * AUDIT_BASE_RATE) == pytest.approx(0.8 * base)
    assert floor(AUDIT_BASE_RATE) == pytest.approx(base)
    assert floor(2 * AUDIT_BASE_RATE) == pytest.approx(2 * base)
    assert floor(0.5) == pytest.approx(MAX_AUDIT_SCALE * base)
    assert floor(0.5, items=100) == 0.3  # still never above 0.3
    assert floor(0.5, configured=0.1) == 0.1  # a project's own rate stands


def test_audit_probability_follows_the_expected_disagreement() -> None:
    q = np.array([0.0, 0.01, 0.05, 0.2, 0.6])
    np.testing.assert_allclose(audit_probability(q, 0.05), [0.05, 0.05, 0.1, 0.4, 1.0])
    np.testing.assert_allclose(audit_probability(q, 0.3), [0.3, 0.3, 0.3, 0.4, 1.0])


def _entry(item_id: str, batch: int, audited: bool = False) -> Entry:
    return Entry(item_id, batch, 0, 0.2, audited)


def test_book_bookkeeping() -> None:
    book = ProposalBook(Assumptions(Guarantee.DATASET, 0.95))
    assert book.next_batch == 1 and not book.has_pending() and book.ledger().audit_prob.size == 0
    for i in range(4):
        book.add(_entry(f"a{i}", 1, audited=i == 0))
    book.add(_entry("a1", 1))  # redelivered: recorded once
    assert len(book.entries) == 4 and book.next_batch == 2
    assert book.batch_state == {1: PENDING} and book.has_pending() and book.pending_items() == 3
    assert [e.item_id for e in book.batch(1)] == ["a0", "a1", "a2", "a3"]
    latest = book.latest("a2")
    assert latest is not None and latest.batch == 1 and book.latest("zz") is None
    book.add(_entry("r0", 7), state=ACCEPTED)  # restored after a restart
    assert book.batch_state[7] == ACCEPTED and book.next_batch == 8
    # Planning's prior: one disagreement in a hundred, then the audits' own rate.
    assert book.disagreement_rate() == pytest.approx(0.5 / 50.0)
    book.record_label("a0", 0)
    assert book.audits() == (1, 0) and book.disagreement_rate() == pytest.approx(0.5 / 51.0)


def test_a_handed_back_item_is_proposable_again_once_the_model_learned_more() -> None:
    book = ProposalBook(Assumptions(Guarantee.AUTOMATIC, 0.95))
    assert book.proposable("new", 10)
    for i in range(20):
        book.add(_entry(f"x{i}", 1, audited=i < 5))
    assert not book.proposable("x7", 100)  # pending
    for i in range(5):
        book.record_label(f"x{i}", 1)
        book.record_second_opinion(f"x{i}", 1)
    assert book.settle(Tally(items=100, auto=0, human=100, model=0), n_labels=100) == ([], [1])
    assert book.batch_state[1] == REJECTED and book.rejected_at[1] == 100
    assert not book.proposable("x7", 100) and not book.proposable("x7", 149)
    assert book.proposable("x7", 150)
    # Proposed again: a new entry in a new batch, the old one kept for the certificate.
    book.add(_entry("x7", 2))
    assert len(book.entries) == 21 and book.batch_state[2] == PENDING
    latest = book.latest("x7")
    assert latest is not None and latest.batch == 2
    assert not book.proposable("x7", 1000)


def test_the_allocation_cap_spends_the_targets_room_on_the_most_confident_candidates() -> None:
    book = ProposalBook(Assumptions(Guarantee.DATASET, 0.9))
    tally = Tally(items=1000, auto=0, human=1000, model=0)
    # Every candidate's expected wrong labels together (75) fit the room (100 of 1,000): the cap is
    # the least confident one's estimate, above the 0.1 the target allows per item.
    q = np.linspace(0.0, 0.15, 1000)
    assert book.allocation_cap(q, tally) == pytest.approx(0.15)
    # Estimates further out are not trusted: at most ALLOCATION_STRETCH times the per-item room.
    wide = np.linspace(0.0, 0.5, 1000)
    assert book.allocation_cap(wide, tally) == pytest.approx(ALLOCATION_STRETCH * 0.1)
    # The m most confident whose expected wrong labels fit, with people's errors on the rest.
    careful = ProposalBook(Assumptions(Guarantee.DATASET, 0.9, human_error=0.05))
    m = int((np.cumsum(wide) + 0.05 * (1000 - np.arange(1, 1001)) <= 100.0).sum())
    assert careful.allocation_cap(wide, tally) == pytest.approx(wide[m - 1]) and 0.15 < wide[m - 1] < 0.3
    # Room spent on automatic labels already accepted is gone (at the audits' disagreement rate).
    for i in range(40):
        careful.add(Entry(f"a{i}", 1, 0, 1.0, True, disagreed=i < 20), state=ACCEPTED)
    spent = Tally(items=1000, auto=600, human=400, model=0)
    assert careful.allocation_cap(wide, spent) == pytest.approx(1.0 - 0.9 + 0.05)  # never below per item
    # Automatic labels alone: the candidates' mean estimate within 1 - target.
    auto = ProposalBook(Assumptions(Guarantee.AUTOMATIC, 0.9))
    m = int((np.cumsum(q) <= 0.1 * np.arange(1, q.size + 1)).sum())
    assert auto.allocation_cap(q, tally) == pytest.approx(q[m - 1])
    assert book.allocation_cap(np.zeros(0), tally) == pytest.approx(0.1)


def test_a_target_above_peoples_own_accuracy_gets_a_batch_large_enough_to_meet_it() -> None:
    # People at 2% cannot make 0.98 alone: only enough automatic labels better than theirs can,
    # so a plan limited to 50 items finds nothing and proposes the smallest batch that would.
    book = ProposalBook(Assumptions(Guarantee.DATASET, 0.98, human_error=0.02, n_classes=2))
    tally = Tally(items=20_000, auto=0, human=20_000, model=0)
    conf = np.full(18_000, 0.9995)
    plan = book.plan(conf, tally, floor=0.3, max_items=50)
    assert plan is not None and 50 < len(plan.rows) < 18_000 and plan.predicted_lower_bound >= 0.98
    half = plan.rows[: len(plan.rows) // 2]
    assert book._plan_of(half, np.full(half.size, 0.005), book.ledger(), tally, 0.3, 0) is None
    # Within the limit when a small batch fits, as before.
    easy = ProposalBook(Assumptions(Guarantee.DATASET, 0.9, human_error=0.02, n_classes=2))
    plan = easy.plan(conf, tally, floor=0.3, max_items=50)
    assert plan is not None and len(plan.rows) <= 50
