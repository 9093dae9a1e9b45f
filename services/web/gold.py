"""Gold questions from an uploaded JSONL or CSV file: each row checked where its line number is
still known, the good ones sent to AddGold in calls of at most GOLD_PER_CALL.

The review service refuses a whole call for one bad row, so a row it would refuse (no id, no
text, an answer that is not one of the project's labels, an id seen earlier in the file) is left
out here and listed with its line; the rest go through.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.gen.tandem.workforce.v1 import workforce_pb2
from services.web.uploads import MAX_SHOWN_REJECTIONS, ChunkSource, csv_rows, jsonl_rows, lines

# What AddGold takes per call and the longest text it keeps (services/review/workforce.py).
GOLD_PER_CALL = 1000
MAX_GOLD_TEXT = 20_000

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


def _first(row: dict[str, Any], names: Sequence[str]) -> str:
    for name in names:
        value = row.get(name)
        if value is not None and str(value).strip():
            return str(value).strip()
    return ""


def gold_item(row: dict[str, Any], labels: Sequence[str]) -> workforce_pb2.GoldItem | str:
    """A row as a gold question, or what is wrong with it."""
    external_id = _first(row, ("id", "external_id"))
    text = row.get("text")
    answer = _first(row, ("label", "answer"))
    if not external_id:
        return "no id (an 'id' or 'external_id' field)"
    if not isinstance(text, str) or not text.strip():
        return f"{external_id}: no text"
    if len(text) > MAX_GOLD_TEXT:
        return f"{external_id}: text longer than {MAX_GOLD_TEXT:,} characters"
    if not answer:
        return f"{external_id}: no answer (a 'label' or 'answer' field)"
    if answer not in labels:
        return f"{external_id}: {answer!r} is not one of the project's labels ({', '.join(labels)})"
    return workforce_pb2.GoldItem(external_id=external_id, text=text, answer=answer)


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
