"""What the labeling screen gets of a task, and the rules for what it may show."""

from __future__ import annotations

import string
import time
from typing import Any

from services.gen.tandem.review.v1 import review_pb2

# 1–9, then letters; s, u and the help key are the screen's own commands.
RESERVED_KEYS = frozenset("su")
SHORTCUT_KEYS = tuple("123456789") + tuple(c for c in string.ascii_lowercase if c not in RESERVED_KEYS)
# Audits measure the model and second opinions check a person: a suggestion would anchor the
# answer on exactly what is being measured. The control arm and gold items measure people without
# the model. The review service blanks the suggestion on these (and on every task of a project
# that hides suggestions); this is a second guard, should a task ever arrive with one.
_BLIND_REASONS = (
    "audit",
    "second_opinion",
    "second opinion",
    "label_error",
    "label-error",
    "control",
    "gold",
)


def shortcuts(count: int) -> list[str]:
    """A key per label while keys last; the filter box reaches the rest."""
    return [SHORTCUT_KEYS[i] if i < len(SHORTCUT_KEYS) else "" for i in range(count)]


def shows_suggestion(task: review_pb2.Task) -> bool:
    if task.round >= 1 or not task.suggested_label:
        return False
    reason = task.reason.lower()
    return not any(word in reason for word in _BLIND_REASONS)


def kind(task: review_pb2.Task) -> str:
    reason = task.reason.lower()
    if task.round >= 1 or "second" in reason or "label_error" in reason or "label-error" in reason:
        return "second opinion"
    if "audit" in reason:
        return "audit"
    return reason.replace("_", " ") or "review"


def task_json(task: review_pb2.Task) -> dict[str, Any]:
    """The task as the screen needs it. A hidden suggestion is left out of the answer altogether,
    so not even the browser's developer tools can anchor the person."""
    show = shows_suggestion(task)
    return {
        "task_id": task.task_id,
        "lease_id": task.lease_id,
        "lease_expires_unix_ms": task.lease_expires_unix_ms,
        "project_id": task.project_id,
        "external_id": task.external_id,
        "text": task.text,
        "kind": kind(task),
        "round": task.round,
        "synthetic": task.synthetic,
        "suggestion": {"label": task.suggested_label, "confidence": round(task.confidence, 3)}
        if show
        else None,
    }


def now_ms() -> int:
    return int(time.time() * 1000)
