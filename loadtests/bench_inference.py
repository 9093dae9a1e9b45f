"""Throughput of an inference backend on this machine: items/s, tokens/s, prefix-cache hit rate,
latency, and (with a labeled corpus) accuracy and agreement of the two label methods.

    python -m loadtests.bench_inference --backend vllm --model DIR --items 256 --labels 4 --prompt-chars 1500
    python -m loadtests.bench_inference --backend vllm --model DIR --corpus data.jsonl --offset 6000 --items 500

Every item is its own `prelabel` call and all are submitted at once, as a worker does with a
bus batch: the backend's concurrency bound and vLLM's continuous batching do the rest. The
cache hit rate is computed from the prompt tokens each request reports as served from the
prefix cache (`num_cached_tokens`); scoring requests ask for prompt logprobs, which vLLM does
not serve from the cache, so that method shows a low rate by design.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from services.common.projects import LabelSpec, ProjectSpec

console = Console()
WORDS = [
    "market",
    "team",
    "research",
    "policy",
    "storm",
    "recipe",
    "election",
    "match",
    "profit",
    "planet",
    "court",
    "vaccine",
    "launch",
    "league",
    "merger",
    "galaxy",
    "harvest",
    "budget",
    "striker",
    "orbit",
    "tariff",
    "goal",
]


NATO = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliett",
    "kilo",
    "lima",
    "mike",
]


@dataclass
class Run:
    method: str
    items: int
    seconds: float
    latencies: list[float]
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    predictions: np.ndarray


def synthetic_project(labels: int, prompt_chars: int) -> ProjectSpec:
    rng = random.Random(1)
    # Distinct initials, so the labels' first tokens differ and the choice method applies.
    names = [NATO[i % len(NATO)] + ("" if i < len(NATO) else str(i)) for i in range(labels)]
    instructions = "Classify the text by its main topic."
    # Pad the shared part of the prompt to the requested size, as long instructions would.
    while len(instructions) < prompt_chars:
        instructions += " " + " ".join(rng.choice(WORDS) for _ in range(12)) + "."
    return ProjectSpec(
        project_id="bench",
        name="bench",
        labels=tuple(LabelSpec(n, f"Texts about {WORDS[i % len(WORDS)]}.") for i, n in enumerate(names)),
        instructions=instructions[:prompt_chars],
        target_accuracy=0.9,
        audit_rate=0.0,
    )


def synthetic_items(n: int) -> list[str]:
    rng = random.Random(2)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 30))) for _ in range(n)]


def corpus_items(path: Path, offset: int, n: int) -> tuple[ProjectSpec, list[str], list[str]]:
    texts: list[str] = []
    gold: list[str] = []
    with path.open() as fh:
        for i, line in enumerate(fh):
            if i < offset:
                continue
            record = json.loads(line)
            texts.append(str(record["text"]))
            gold.append(str(record["label"]))
            if len(texts) >= n:
                break
    names = sorted(set(gold))
    project = ProjectSpec(
        path.parent.name, path.parent.name, tuple(LabelSpec(n, "") for n in names), "", 0.9, 0.0
    )
    return project, texts, gold


async def build_backend(args: argparse.Namespace) -> Any:
    if args.backend == "vllm":
        from services.inference.vllm_backend import VllmBackend, VllmConfig

        config = VllmConfig(
            model=args.model,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            kv_cache_bytes=args.kv_cache_bytes,
            enforce_eager=args.enforce_eager,
            block_size=args.block_size,
            max_concurrency=args.concurrency,
        )
        backend: Any = VllmBackend(config)
    else:
        from services.inference.openai_backend import OpenAIBackend, OpenAIConfig

        backend = OpenAIBackend(
            OpenAIConfig(base_url=args.base_url, model=args.model, max_concurrency=args.concurrency)
        )
    started = time.perf_counter()
    await backend.start()
    console.print(f"{args.backend} backend started in {time.perf_counter() - started:.1f}s")
    return backend


async def run_method(backend: Any, project: ProjectSpec, texts: list[str], method: str) -> Run:
    # One warm-up item per method: the first request pays for prompt encoding and graph set-up.
    await backend.prelabel(project, texts[:1], method=method)
    method = backend.last_method  # a project whose labels share a first token is scored
    before = backend.stats.snapshot()
    latencies: list[float] = []

    async def one(text: str) -> np.ndarray:
        t0 = time.perf_counter()
        result = await backend.prelabel(project, [text], method=method)
        latencies.append(time.perf_counter() - t0)
        row: np.ndarray = result.probs[0]
        return row

    started = time.perf_counter()
    rows = await asyncio.gather(*(one(t) for t in texts))
    seconds = time.perf_counter() - started
    after = backend.stats.snapshot()
    return Run(
        method,
        len(texts),
        seconds,
        latencies,
        after.prompt_tokens - before.prompt_tokens,
        after.cached_tokens - before.cached_tokens,
        after.generated_tokens - before.generated_tokens,
        np.vstack(rows),
    )


def report(runs: list[Run], gold: list[str] | None, project: ProjectSpec) -> None:
    table = Table(title=f"inference benchmark: {runs[0].items} items, {len(project.labels)} labels")
    for col in (
        "method",
        "items/s",
        "prompt tok/s",
        "gen tok/s",
        "cache hit",
        "p50 ms",
        "p99 ms",
        "accuracy",
    ):
        table.add_column(col, justify="right")
    for r in runs:
        lat = sorted(r.latencies)
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        accuracy = "-"
        if gold is not None:
            idx = np.array([project.label_index(g) for g in gold])
            accuracy = f"{(r.predictions.argmax(1) == idx).mean():.3f}"
        table.add_row(
            r.method,
            f"{r.items / r.seconds:.1f}",
            f"{r.prompt_tokens / r.seconds:,.0f}",
            f"{r.generated_tokens / r.seconds:,.0f}",
            f"{r.cached_tokens / r.prompt_tokens:.1%}" if r.prompt_tokens else "-",
            f"{statistics.median(lat) * 1000:.0f}",
            f"{p99 * 1000:.0f}",
            accuracy,
        )
    console.print(table)
    if len(runs) == 2:
        a, b = (r.predictions for r in runs)
        agree = (a.argmax(1) == b.argmax(1)).mean()
        console.print(f"argmax agreement between {runs[0].method} and {runs[1].method}: {agree:.3f}")


async def main_async(args: argparse.Namespace) -> None:
    gold: list[str] | None = None
    if args.corpus is not None:
        project, texts, gold = corpus_items(args.corpus, args.offset, args.items)
    else:
        project, texts = synthetic_project(args.labels, args.prompt_chars), synthetic_items(args.items)
    backend = await build_backend(args)
    try:
        methods = ["score", "choice"] if args.method == "both" else [args.method]
        runs = [await run_method(backend, project, texts, m) for m in methods]
    finally:
        await backend.close()
    report(runs, gold, project)


def main() -> None:
    p = argparse.ArgumentParser(description="Benchmark an inference backend.")
    p.add_argument("--backend", choices=["vllm", "openai"], default="vllm")
    p.add_argument("--model", required=True, help="vllm: model directory; openai: served model name")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="openai backend endpoint")
    p.add_argument("--items", type=int, default=256)
    p.add_argument("--labels", type=int, default=4)
    p.add_argument("--prompt-chars", type=int, default=1500, help="size of the shared instructions")
    p.add_argument("--corpus", type=Path, help="labeled JSONL (text, label), read by path")
    p.add_argument("--offset", type=int, default=0, help="skip this many corpus rows (e.g. training rows)")
    p.add_argument("--method", choices=["score", "choice", "both"], default="both")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--kv-cache-bytes", type=int, default=None, help="CPU: KV cache size in bytes")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
