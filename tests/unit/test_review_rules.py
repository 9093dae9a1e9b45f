"""services/review/service.py: who may label, skip or extend a review task."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from services.review.handlers import STATUS_OF
from services.review.service import (
    LeaseClaim,
    PriorLabel,
    Reason,
    Refused,
    State,
    Submit,
    Task,
    check_lease,
    check_submit,
    labeled_other_task,
    lease_seconds,
    shows_suggestion,
    state_after_lease,
)

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
LABELS = ("yes", "no")
LEASE = "5f0c6a4e-0000-4000-8000-000000000001"

LEASED = Task(
    task_id="t1",
    item_id="i1",
    project_id="p",
    external_id="e",
    text="x",
    suggested_label="",
    confidence=0.0,
    reason="",
    synthetic=False,
    state=State.LEASED,
    lease_id=LEASE,
    lease_owner="ann",
    lease_expires_at=NOW + timedelta(seconds=30),
    round=0,
)
OPEN = replace(LEASED, state=State.OPEN, lease_id=None, lease_owner=None, lease_expires_at=None)


def _claim(who: str = "ann", lease: str = LEASE, now: datetime = NOW) -> LeaseClaim:
    return LeaseClaim(who, lease, now)


def _refusal(
    task: Task, claim: LeaseClaim, prior: list[PriorLabel] | None = None, label: str = "yes"
) -> Reason:
    with pytest.raises(Refused) as refused:
        check_submit(task, claim, label, LABELS, prior or [])
    assert refused.value.message  # a client is told what happened, in words
    return refused.value.reason


def test_the_lease_holder_may_label() -> None:
    assert check_submit(LEASED, _claim(), "no", LABELS, []) is Submit.RECORD


@pytest.mark.parametrize(
    ("task", "claim", "reason"),
    [
        (OPEN, _claim(), Reason.NOT_LEASED),  # nobody took it: NextTask first
        (OPEN, _claim(lease=""), Reason.NOT_LEASED),
        (LEASED, _claim(who="other"), Reason.LEASE_HELD_BY_OTHER),
        # Someone else's lease id does not make it theirs either.
        (LEASED, _claim(who="other", lease=LEASE), Reason.LEASE_HELD_BY_OTHER),
        # The holder's earlier lease, after the task expired and came back to them.
        (LEASED, _claim(lease="5f0c6a4e-0000-4000-8000-000000000002"), Reason.LEASE_STALE),
        (LEASED, _claim(lease=""), Reason.LEASE_STALE),
        # Past its time but not yet swept back into the queue: over all the same.
        (LEASED, _claim(now=NOW + timedelta(seconds=30)), Reason.LEASE_EXPIRED),
        (replace(OPEN, state=State.WITHDRAWN), _claim(), Reason.WITHDRAWN),
    ],
)
def test_only_the_current_lease_may_label(task: Task, claim: LeaseClaim, reason: Reason) -> None:
    assert _refusal(task, claim) is reason


def test_an_unknown_label_is_refused_before_anything_else() -> None:
    assert _refusal(OPEN, _claim(), label="maybe") is Reason.UNKNOWN_LABEL
    assert _refusal(LEASED, _claim(), label="") is Reason.UNKNOWN_LABEL


def test_a_retried_submit_is_answered_only_for_its_own_label() -> None:
    done = replace(OPEN, state=State.DONE)
    assert (
        check_submit(done, _claim(lease=""), "yes", LABELS, [PriorLabel(0, "ann")]) is Submit.ALREADY_RECORDED
    )
    assert _refusal(done, _claim(who="other"), [PriorLabel(0, "ann")]) is Reason.ALREADY_LABELED
    # The caller's label on an earlier round is not a label on this task.
    second_done = replace(done, round=1)
    assert (
        _refusal(second_done, _claim(), [PriorLabel(0, "ann"), PriorLabel(1, "b")]) is Reason.ALREADY_LABELED
    )


def test_a_withdrawn_task_still_takes_its_holders_label() -> None:
    asked_to_go = replace(LEASED, withdraw_requested=True)
    assert check_submit(asked_to_go, _claim(), "yes", LABELS, []) is Submit.RECORD


def test_nobody_gives_the_second_opinion_on_their_own_label() -> None:
    second = replace(LEASED, round=1)
    assert _refusal(second, _claim(), [PriorLabel(0, "ann")]) is Reason.OWN_LABEL
    # Someone else's first label is what a second opinion is for.
    assert check_submit(second, _claim(), "yes", LABELS, [PriorLabel(0, "first")]) is Submit.RECORD
    # The other way round confirms oneself just the same: the second opinion came first.
    assert _refusal(LEASED, _claim(), [PriorLabel(1, "ann")]) is Reason.OWN_LABEL
    assert check_submit(LEASED, _claim(), "yes", LABELS, [PriorLabel(1, "second")]) is Submit.RECORD


def test_labeled_other_task() -> None:
    assert labeled_other_task(2, 0, "ann", [PriorLabel(0, "b"), PriorLabel(1, "ann")])
    assert labeled_other_task(0, 0, "ann", [PriorLabel(2, "ann")])
    assert not labeled_other_task(1, 0, "ann", [PriorLabel(1, "ann"), PriorLabel(0, "b")])
    assert not labeled_other_task(1, 0, "ann", [])
    # Overlap: another slot of the same round is another task of the item.
    assert labeled_other_task(0, 1, "ann", [PriorLabel(0, "ann", 0)])
    assert not labeled_other_task(0, 1, "ann", [PriorLabel(0, "ann", 1), PriorLabel(0, "b", 0)])


def test_skip_and_extend_need_the_current_lease() -> None:
    check_lease(LEASED, _claim())
    check_lease(replace(LEASED, withdraw_requested=True), _claim())
    for task, claim, reason in [
        (OPEN, _claim(), Reason.NOT_LEASED),
        (LEASED, _claim(who="other"), Reason.LEASE_HELD_BY_OTHER),
        (LEASED, _claim(lease="nope"), Reason.LEASE_STALE),
        (LEASED, _claim(now=NOW + timedelta(hours=1)), Reason.LEASE_EXPIRED),
        (replace(OPEN, state=State.DONE), _claim(), Reason.ALREADY_LABELED),
        (replace(OPEN, state=State.WITHDRAWN), _claim(), Reason.WITHDRAWN),
    ]:
        with pytest.raises(Refused) as refused:
            check_lease(task, claim)
        assert refused.value.reason is reason, (task.state, claim)


def test_an_unanswered_lease_ends_in_the_queue_unless_the_task_was_withdrawn() -> None:
    assert state_after_lease(LEASED) is State.OPEN
    assert state_after_lease(replace(LEASED, withdraw_requested=True)) is State.WITHDRAWN


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        (0.0, 300.0),
        (-5.0, 300.0),
        (float("nan"), 300.0),
        (60.0, 60.0),
        (7200.0, 3600.0),
        (float("inf"), 3600.0),
    ],
)
def test_lease_seconds(requested: float, expected: float) -> None:
    assert lease_seconds(requested, 300.0, 3600.0) == expected
    assert lease_seconds(0.0, 5000.0, 3600.0) == 3600.0  # a default above the cap is capped too


def test_every_refusal_has_a_status() -> None:
    assert set(STATUS_OF) == set(Reason)


@pytest.mark.parametrize(
    ("reason", "round_", "project_hides", "shown"),
    [
        ("uncertain", 0, False, True),
        ("warmup", 0, False, True),
        ("uncertain", 0, True, False),
        ("audit", 0, False, False),
        ("handed_back", 0, False, False),
        ("control", 0, False, False),
        ("second_opinion", 1, False, False),
        ("uncertain", 1, False, False),
    ],
)
def test_the_suggestion_is_shown_only_where_it_cannot_bias_a_measurement(
    reason: str, round_: int, project_hides: bool, shown: bool
) -> None:
    assert shows_suggestion(replace(OPEN, reason=reason, round=round_), project_hides) is shown
