"""Builds the tiny Llama-style model the vLLM tier runs, locally and in about half a minute.

No Hub: a byte-level BPE tokenizer is trained with `tokenizers` on generated text, a 2-layer
`LlamaConfig` model (hidden 128) is initialised, and then trained for a few hundred steps on a
trivially separable task: texts built from a label's keywords, rendered with the very prompts
the inference service sends (`services.inference.prompts`), followed by the label. A random
model has no preferences, so a test of "both label methods agree on a clear case" would only
test noise; after this training the model's preferences are real, and the tests can assert on
them honestly. It also learns to answer generation prompts with such texts.

`python -m tests.vllm.tiny_model OUT_DIR [--corpus FILE.jsonl --train-rows N]` trains on a
labeled JSONL file (text, label) instead, e.g. a shared dataset read by path.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.common.fewshot import Demonstration
from services.common.projects import LabelSpec, ProjectSpec
from services.inference.prompts import LabelPrompt, generation_messages

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

KEYWORDS: dict[str, tuple[str, ...]] = {
    "sports": ("team", "match", "goal", "coach", "league", "player", "season", "score", "stadium", "cup"),
    "business": (
        "market",
        "profit",
        "shares",
        "bank",
        "investor",
        "revenue",
        "merger",
        "stock",
        "earnings",
        "trade",
    ),
    "science": (
        "research",
        "telescope",
        "cells",
        "physics",
        "experiment",
        "planet",
        "genome",
        "lab",
        "quantum",
        "fossil",
    ),
}
FILLER = (
    "the",
    "a",
    "new",
    "report",
    "today",
    "after",
    "with",
    "said",
    "on",
    "big",
    "week",
    "latest",
    "in",
    "of",
)

TINY_PROJECT = ProjectSpec(
    project_id="tiny-topics",
    name="Tiny topics",
    labels=(
        LabelSpec("sports", "Games, teams, players and matches."),
        LabelSpec("business", "Companies, markets, money and trade."),
        LabelSpec("science", "Research, experiments and discoveries."),
    ),
    instructions="Classify the news snippet by topic.",
    target_accuracy=0.9,
    audit_rate=0.0,
)


def synthetic_text(label: str, rng: random.Random) -> str:
    words = [rng.choice(KEYWORDS[label]) for _ in range(rng.randint(3, 5))]
    words += [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
    rng.shuffle(words)
    return " ".join(words).capitalize() + "."


def synthetic_corpus(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    labels = list(KEYWORDS)
    return [(synthetic_text(labels[i % len(labels)], rng), labels[i % len(labels)]) for i in range(n)]


def _render(tokenizer: Any, messages: list[dict[str, str]], answer: str) -> str:
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{prompt}{answer}<|end|>\n"


def training_texts(
    project: ProjectSpec, corpus: Sequence[tuple[str, str]], tokenizer: Any, seed: int
) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    for text, label in corpus:
        # Some prompts carry a demonstration, so the model copes with few-shot prompts as well.
        demos = [Demonstration("", t, lb) for t, lb in rng.sample(list(corpus), int(rng.random() < 0.3))]
        prompt = LabelPrompt.build(project, demos)
        out.append(_render(tokenizer, prompt.messages(text), label))
        if rng.random() < 0.15:
            out.append(_render(tokenizer, generation_messages(project, label), text))
    return out


def build_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>", bos_token="<|end|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(
    out: Path,
    *,
    project: ProjectSpec = TINY_PROJECT,
    corpus: Sequence[tuple[str, str]] | None = None,
    steps: int = 200,
    seed: int = 0,
) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    corpus = list(corpus) if corpus is not None else synthetic_corpus(300, seed)
    # The tokenizer learns from the prompts themselves, so labels and prompt words are whole tokens.
    seed_texts = [t for t, _ in corpus] + [LabelPrompt.build(project).system] * 50
    seed_texts += [lb.name for lb in project.labels] * 50
    tokenizer = build_tokenizer(seed_texts, vocab_size=2048)
    texts = training_texts(project, corpus, tokenizer, seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        batch = tokenizer(
            rng.sample(texts, 8), return_tensors="pt", padding=True, truncation=True, max_length=256
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d} loss {loss.item():.3f} ({time.perf_counter() - started:.0f}s)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "tandem-tiny.json").write_text(json.dumps({"project": project.project_id, "steps": steps}))
    return out


def _read_corpus(path: Path, rows: int) -> tuple[ProjectSpec, list[tuple[str, str]]]:
    pairs: list[tuple[str, str]] = []
    with path.open() as fh:
        for line in fh:
            record = json.loads(line)
            pairs.append((str(record["text"]), str(record["label"])))
            if len(pairs) >= rows:
                break
    names = sorted({lb for _, lb in pairs})
    project = ProjectSpec(
        project_id=path.parent.name.replace("_", "-") or "corpus",
        name=path.parent.name,
        labels=tuple(LabelSpec(n, "") for n in names),
        instructions="",
        target_accuracy=0.9,
        audit_rate=0.0,
    )
    return project, pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--corpus", type=Path, help="JSONL with text and label (read, never copied)")
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    if args.corpus is not None:
        project, pairs = _read_corpus(args.corpus, args.train_rows)
        build(args.out, project=project, corpus=pairs, steps=args.steps)
    else:
        build(args.out, steps=args.steps)
    print(f"tiny model written to {args.out}")


if __name__ == "__main__":
    main()
