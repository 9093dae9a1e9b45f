"""Gold questions as clients send them: a file row checked into a `GoldItem`, and the limits
AddGold keeps. Shared by the review service (which enforces them), the CLI and the web app
(which check each row where its line number is still known: the service refuses a whole call
for one bad row)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.gen.tandem.workforce.v1 import workforce_pb2

GOLD_PER_CALL = 1000  # items per AddGold call
MAX_GOLD_TEXT = 20_000  # characters of one gold text


def _first(row: dict[str, Any], names: Sequence[str]) -> str:
    for name in names:
        value = row.get(name)
        if value is not None and str(value).strip():
            return str(value).strip()
    return ""


def gold_item(row: dict[str, Any], labels: Sequence[str]) -> workforce_pb2.GoldItem | str:
    """A file row (`id`/`external_id`, `text`, `label`/`answer`) as a gold question, or what is
    wrong with it."""
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
