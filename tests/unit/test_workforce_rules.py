"""The workforce rules of the review service (pure): routing, capacity, gold, overlap."""

from __future__ import annotations

import uuid
from collections import Counter

import pytest

from services.review.service import (
    GoldPolicy,
    Person,
    Reason,
    Refused,
    Settle,
    SlotState,
    Standing,
    State,
    below_bar,
    check_capacity,
    pool_for_task,
    queue_for,
    settle,
    skills_for,
    slots_needed,
    wants_gold,
)


def _person(pool: str = "", leased: int = 0, cap: int = 0) -> Person:
    return Person("ann", pool, (), cap, leased)


def test_queue_is_the_pool_when_the_project_names_pools() -> None:
    assert queue_for([], _person("any"), Standing()) == ""
    assert queue_for(["a", "b"], _person("b"), Standing()) == "b"
    with pytest.raises(Refused) as refused:
        queue_for(["a"], _person("b"), Standing())
    assert refused.value.reason is Reason.NOT_IN_POOL and "pool 'b'" in refused.value.message
    with pytest.raises(Refused) as refused:
        queue_for(["a"], _person(""), Standing())
    assert "no pool" in refused.value.message
    with pytest.raises(Refused) as refused:
        queue_for([], _person(), Standing(paused=True, paused_reason="gold accuracy 1/6"))
    assert refused.value.reason is Reason.PAUSED and "gold accuracy 1/6" in refused.value.message


def test_capacity_per_person_and_per_pool() -> None:
    check_capacity(_person(leased=1), 2, None, 0)
    with pytest.raises(Refused) as refused:
        check_capacity(_person(leased=2), 2, None, 0)
    assert refused.value.reason is Reason.AT_CAPACITY
    # A person's own cap wins over the default; 0 everywhere = no cap.
    check_capacity(_person(leased=5, cap=6), 2, None, 0)
    check_capacity(_person(leased=50), 0, None, 0)
    with pytest.raises(Refused) as refused:
        check_capacity(_person(leased=0), 2, 10, 10)
    assert refused.value.reason is Reason.POOL_AT_CAPACITY
    check_capacity(_person(leased=0), 2, 9, 10)


def test_tasks_go_to_pools_by_their_shares_and_always_the_same_way() -> None:
    pools = (("house", 3.0), ("crowd", 1.0))
    ids = [str(uuid.uuid4()) for _ in range(4000)]
    got = Counter(pool_for_task(i, pools) for i in ids)
    assert 900 <= got["crowd"] <= 1100 and got["house"] == 4000 - got["crowd"]
    assert [pool_for_task(i, pools) for i in ids[:50]] == [pool_for_task(i, pools) for i in ids[:50]]
    assert pool_for_task(ids[0], ()) == ""


def test_skills_come_from_the_named_metadata_fields() -> None:
    assert skills_for(["language", "domain"], {"language": "de", "region": "eu"}) == ["language=de"]
    assert skills_for([], {"language": "de"}) == []
    assert skills_for(["language"], {"language": ""}) == []


def test_new_people_get_gold_often_then_a_steady_share() -> None:
    policy = GoldPolicy.of(20, 0.5, 0.1, 0.7)
    assert wants_gold(policy, Standing(served=0), 0.49) and not wants_gold(policy, Standing(served=0), 0.5)
    assert wants_gold(policy, Standing(served=20), 0.09) and not wants_gold(policy, Standing(served=20), 0.2)
    assert GoldPolicy.of(0, 0, 0, 0) == GoldPolicy(30, 0.5, 0.1, 0.7)


def test_pause_needs_enough_gold_and_a_bound_under_the_bar() -> None:
    assert not below_bar(0, 4, 0.7)  # too few answers to judge anyone
    assert below_bar(0, 5, 0.7)
    assert below_bar(4, 10, 0.7)  # a 4-way spammer's typical score
    assert not below_bar(3, 5, 0.7)  # unlucky, or not: not enough to say
    assert not below_bar(17, 20, 0.7)


def test_low_confidence_starts_with_one_more_person() -> None:
    assert slots_needed(1, 0, 0.0, 0.1) == 1
    assert slots_needed(2, 3, 0.5, 0.4) == 3
    assert slots_needed(2, 3, 0.5, 0.6) == 2
    assert slots_needed(2, 2, 0.5, 0.1) == 2  # no room above the overlap


def _slots(*labels: tuple[str, str | None]) -> list[SlotState]:
    return [
        SlotState(i, State.DONE if label else State.OPEN, who if label else None, label)
        for i, (who, label) in enumerate(labels)
    ]


def test_settle_waits_asks_one_more_or_aggregates() -> None:
    assert settle(_slots(("a", "x"), ("b", None)), 2, 3, ()) is Settle.WAIT
    assert settle(_slots(("a", "x"), ("b", "x")), 2, 3, ()) is Settle.FINAL
    assert settle(_slots(("a", "x"), ("b", "y")), 2, 3, ()) is Settle.ONE_MORE
    assert settle(_slots(("a", "x"), ("b", "y"), ("c", "x")), 2, 3, ()) is Settle.FINAL  # at the maximum
    assert settle(_slots(("a", "x"), ("b", "y")), 2, 0, ()) is Settle.FINAL  # no dynamic rule


def test_a_paused_persons_label_is_replaced_once_not_forever() -> None:
    assert settle(_slots(("a", "x"), ("spam", "y")), 2, 0, {"spam"}) is Settle.ONE_MORE
    replaced = _slots(("a", "x"), ("spam", "y"), ("b", "x"))
    assert settle(replaced, 2, 0, {"spam"}) is Settle.FINAL
    # Paused labels do not use up the dynamic overlap either.
    assert settle(_slots(("a", "x"), ("spam", "y"), ("b", "z")), 2, 3, {"spam"}) is Settle.ONE_MORE


def test_withdrawn_items_settle_with_what_they_have() -> None:
    withdrawn = [*_slots(("a", "x")), SlotState(1, State.WITHDRAWN, None, None)]
    assert settle(withdrawn, 2, 3, ()) is Settle.FINAL
