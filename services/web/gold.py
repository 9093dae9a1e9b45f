"""Gold questions from an uploaded JSONL or CSV file: each row checked where its line number is
still known, the good ones sent to AddGold in calls of at most GOLD_PER_CALL.

The review service refuses a whole call for one bad row, so a row it would refuse (no id, no
text, an answer that is not one of the project's labels, an id seen earlier in the file) is left
out here and listed with its line; the rest go through.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from services.common.gold import GOLD_PER_CALL, gold_item
from services.gen.tandem.workforce.v1 import workforce_pb2
from services.web.uploads import MAX_SHOWN_REJECTIONS, ChunkSource, csv_rows, jsonl_rows, lines

Send = Callable[[list[workforce_pb2.GoldItem]], Awaitable[workforce_pb2.AddGoldResponse]]


@dataclass
class GoldResult:
    filename: str
    rows: int = 0
    added: int = 0
    total: int = 0  # gold questions the project has now
    rejected: int = 0
    rejections: list[tuple[str, str]] = field(default_factory=list)  # (line, reason), the first ones

    def reject(self, where: str, reason: str) -> None:
        self.rejected += 1
        if len(self.rejections) < MAX_SHOWN_REJECTIONS:
            self.rejections.append((where, reason))

    @property
    def truncated(self) -> bool:
        return self.rejected > len(self.rejections)


async def add_gold_file(
    source: ChunkSource, *, filename: str, labels: Sequence[str], send: Send, max_bytes: int
) -> GoldResult:
    result = GoldResult(filename)
    text = lines(source, max_bytes)
    rows = csv_rows(text) if filename.lower().endswith(".csv") else jsonl_rows(text)
    batch: list[workforce_pb2.GoldItem] = []
    # Ids already taken by earlier lines: one call naming an id twice would be refused whole.
    seen: dict[str, int] = {}

    async def flush() -> None:
        if batch:
            answer = await send(batch)
            result.added += answer.added
            result.total = answer.total
            batch.clear()

    async for lineno, row, error in rows:
        result.rows += 1
        checked = gold_item(row, labels) if row is not None else error
        if isinstance(checked, str):
            result.reject(f"line {lineno}", checked)
        elif checked.external_id in seen:
            result.reject(
                f"line {lineno}", f"{checked.external_id}: the same id as line {seen[checked.external_id]}"
            )
        else:
            seen[checked.external_id] = lineno
            batch.append(checked)
            if len(batch) >= GOLD_PER_CALL:
                await flush()
    await flush()
    return result
