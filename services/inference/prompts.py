"""Prompts for the backends that ask a language model: labeling and synthetic examples.

Layout for prefix caching: everything shared by a project's items (instructions, the labels
with their descriptions, the few-shot demonstrations) comes first and is byte-identical from
item to item; the item's text comes last. vLLM then computes the shared prefix once and serves
it from its prefix cache for every later item of the project.

Prompts are chat messages; a model with a chat template renders them with it, a plain base
model gets the same content as a flat "Text: … / Label: …" transcript (`render_plain`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from services.common.fewshot import Demonstration, FewShotSet
from services.common.projects import ProjectSpec

# Part of every prompt hash: changing the wording below must change the hash.
TEMPLATE_VERSION = "label-v1"
DEFAULT_INSTRUCTIONS = "Classify the text into exactly one of the labels below."
ANSWER_RULE = "Answer with the label name only."
# Items are clipped to this many characters: the text comes last, so clipping never touches
# the cached prefix, and one long item cannot overflow the model's context.
MAX_TEXT_CHARS = 2000


class ChatTokenizer(Protocol):
    """The part of a Hugging Face tokenizer that renders chat messages."""

    chat_template: str | None

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: object) -> object: ...


class DemoSource(Protocol):
    """Where a backend finds a project's demonstrations (`services.common.fewshot.FewShotStore`)."""

    async def get(self, project_id: str) -> FewShotSet | None: ...


Message = dict[str, str]


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit].rstrip() + "…"


@dataclass(frozen=True)
class LabelPrompt:
    """The labeling prompt of one project with one set of demonstrations."""

    system: str
    demos: tuple[Demonstration, ...]
    labels: tuple[str, ...]
    prompt_hash: str

    @classmethod
    def build(cls, project: ProjectSpec, demos: Sequence[Demonstration] = ()) -> LabelPrompt:
        names = {lb.name for lb in project.labels}
        # A demonstration of a label the project no longer has would teach a wrong answer.
        usable = tuple(d for d in demos if d.label in names)
        lines = [(project.instructions.strip() or DEFAULT_INSTRUCTIONS), "", "Labels:"]
        for lb in project.labels:
            desc = " ".join(lb.description.split())
            lines.append(f"- {lb.name}: {desc}" if desc else f"- {lb.name}")
        lines += ["", ANSWER_RULE]
        system = "\n".join(lines)
        payload = json.dumps(
            {
                "template": TEMPLATE_VERSION,
                "system": system,
                "labels": [lb.name for lb in project.labels],
                "demos": [[d.text, d.label] for d in usable],
            },
            ensure_ascii=False,
        )
        return cls(
            system=system,
            demos=usable,
            labels=tuple(lb.name for lb in project.labels),
            prompt_hash=hashlib.sha256(payload.encode()).hexdigest()[:16],
        )

    def messages(self, text: str) -> list[Message]:
        out: list[Message] = [{"role": "system", "content": self.system}]
        for demo in self.demos:
            out.append({"role": "user", "content": f"Text: {_clip(demo.text, MAX_TEXT_CHARS)}"})
            out.append({"role": "assistant", "content": demo.label})
        out.append({"role": "user", "content": f"Text: {_clip(text, MAX_TEXT_CHARS)}"})
        return out


def generation_messages(
    project: ProjectSpec, label: str, demos: Sequence[Demonstration] = ()
) -> list[Message]:
    """Asks for one new example of `label`; the caller samples it `count` times with seeds."""
    spec = next((lb for lb in project.labels if lb.name == label), None)
    if spec is None:
        raise ValueError(f"{label!r} is not a label of project {project.project_id!r}")
    lines = [
        "Write one new, realistic text that a person would label as "
        f"{spec.name!r}" + (f" ({' '.join(spec.description.split())})" if spec.description else "") + ".",
    ]
    if project.instructions.strip():
        lines += ["", "The labeling instructions are:", project.instructions.strip()]
    examples = [d for d in demos if d.label == label][:4]
    if examples:
        lines += ["", "Examples of such texts:"]
        lines += [f"- {_clip(d.text, 400)}" for d in examples]
    lines += ["", "Reply with the new text only."]
    return [{"role": "user", "content": "\n".join(lines)}]


def render_plain(messages: Sequence[Message], cue: str = "Label:") -> str:
    """A flat transcript for models without a chat template; ends where the answer starts."""
    parts: list[str] = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"] + "\n\n")
        elif m["role"] == "user":
            parts.append(f"{m['content']}\n{cue}")
        else:
            parts.append(" " + m["content"] + "\n\n")
    return "".join(parts)


def render(
    messages: Sequence[Message], tokenizer: ChatTokenizer | None, cue: str = "Label:"
) -> tuple[str, str]:
    """The prompt text and the separator the answer follows it with.

    With a chat template the answer starts right after the generation prompt; in the plain
    transcript it follows the cue ("Label:") after a space.
    """
    if tokenizer is not None and tokenizer.chat_template:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        assert isinstance(text, str)
        return text, ""
    return render_plain(messages, cue), " "
