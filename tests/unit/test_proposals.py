"""services/scorer/policy/proposals.py: the audit draw, audit probabilities and the book's
bookkeeping (acceptance itself is tested with the certificate, in test_certification.py)."""

from __future__ import annotations

import numpy as np
import pytest

from services.scorer.policy.certification import Assumptions, Guarantee, Tally
from services.scorer.policy.proposals import (
    ACCEPTED,
    AUDITS_PER_ROOM,
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
