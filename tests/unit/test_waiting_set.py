"""The scorer's in-memory waiting items: slices cover every item round robin, decided items leave,
compaction keeps rows and priorities together."""

from __future__ import annotations

import numpy as np

from services.scorer.policy.proposals import unit_draw
from services.scorer.waiting import WaitingSet


def _filled(n: int, d: int = 6) -> tuple[WaitingSet, list[str], np.ndarray]:
    rng = np.random.default_rng(0)
    ids = [f"item-{i}" for i in range(n)]
    X = rng.standard_normal((n, d)).astype(np.float32)
    ws = WaitingSet(d)
    ws.add(ids, X, [i / n for i in range(n)])
    return ws, ids, X


def test_slices_cover_every_item_once_per_round() -> None:
    ws, ids, _ = _filled(2500)
    seen: list[str] = []
    for _ in range(5):
        seen += ws.next_slice(500).item_ids
    assert sorted(seen) == sorted(ids)
    # The next round starts over.
    assert ws.next_slice(500).item_ids == ids[:500]


def test_a_small_set_is_rescored_whole_each_time() -> None:
    ws, ids, X = _filled(300)
    for _ in range(3):
        part = ws.next_slice(1000)
        assert part.item_ids == ids
        np.testing.assert_allclose(part.X, X, atol=1e-2)  # float16 storage
        assert part.draws.tolist() == [unit_draw(i, "order") for i in ids]


def test_discarded_items_leave_and_compaction_keeps_rows_aligned() -> None:
    ws, ids, X = _filled(10_000)
    ws.next_slice(3000)
    gone = set(ids[:8000:2]) | set(ids[8000:9500])
    ws.discard(gone)
    ws.set_priorities([("item-9999", 0.99), ("item-1", 0.5), ("nobody", 0.1)])
    assert len(ws) == len(ids) - len(gone)
    kept = [i for i in ids if i not in gone]
    part = ws.next_slice(len(ids))
    assert sorted(part.item_ids) == sorted(kept)
    row = {item_id: r for r, item_id in enumerate(part.item_ids)}
    for item_id in ("item-1", "item-4001", "item-9999"):
        i = int(item_id.split("-")[1])
        np.testing.assert_allclose(part.X[row[item_id]], X[i], atol=1e-2)
    assert part.priorities[row["item-9999"]] == 0.99
    assert part.priorities[row["item-1"]] == 0.5
    assert "item-0" not in ws and "item-1" in ws


def test_re_adding_an_item_updates_its_row() -> None:
    ws, _, _ = _filled(10)
    ws.add(["item-3"], np.full((1, 6), 0.25, dtype=np.float32), [0.7], [True])
    part = ws.next_slice(100)
    row = part.item_ids.index("item-3")
    assert len(ws) == 10
    assert part.priorities[row] == 0.7 and part.flagged[row]
    assert np.all(part.X[row] == 0.25)


def test_flagged_slices_match_metadata() -> None:
    ws = WaitingSet(4, [("domain", "kitchen")])
    assert ws.in_flagged_slice({"domain": "kitchen", "x": "y"})
    assert not ws.in_flagged_slice({"domain": "banking"})
    assert not ws.in_flagged_slice({})


def test_memory_is_feature_rows_in_half_precision() -> None:
    ws, _, _ = _filled(4000, d=400)
    # float16 rows dominate: 4000 x 400 x 2 bytes, grown by doubling at most.
    assert 4000 * 400 * 2 <= ws.nbytes <= 2 * 4096 * (400 * 2 + 17)
