"""Offline streaming simulation of the active-learning policy.

Items arrive in random order at the labeler's rate and are scored with the current model; simulated
annotators (with an error rate) label the highest-priority waiting task; the model refits every N new
human labels (or every T simulated seconds) and re-scores waiting reviews, auto-accepting those that now
clear the threshold. The run ends when every item has a final label.

Usage:
    python -m loadtests.policy_sim --cache /tmp/bbc_emb.npy
    python -m loadtests.policy_sim --jsonl data.jsonl --labels labels.json --cache /tmp/emb.npy
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from services.scorer.policy.centroids import (
    CentroidClassifier,
    DecisionKind,
    PolicyConfig,
    calibrate,
    decide,
)


@dataclass(frozen=True)
class Corpus:
    ids: list[str]
    texts: list[str]
    gold: np.ndarray  # class indices
    labels: list[tuple[str, str]]  # (name, description) per class index


@dataclass(frozen=True)
class SimParams:
    seed: int = 0
    arrival_rate: float = 12.0  # items/s entering the scorer (the labeler's CPU throughput)
    annotator_rate: float = 8.0  # human labels/s, all annotators together
    annotator_error: float = 0.02
    refit_every: int = 10  # new human labels between refits
    refit_seconds: float = 5.0  # ... or this many simulated seconds, whichever comes first


@dataclass
class SimResult:
    n: int
    zero_shot_accuracy: float
    final_accuracy: float
    human_share: float
    auto_accepted: int
    auto_accuracy: float
    audits: int
    refits: int
    duration_s: float
    final_threshold: float | None
    thresholds: list[float | None] = field(default_factory=list)


def simulate(
    emb: np.ndarray,
    gold: np.ndarray,
    label_emb: np.ndarray,
    config: PolicyConfig,
    params: SimParams,
) -> SimResult:
    rng = np.random.default_rng(params.seed)
    n, k = int(emb.shape[0]), int(label_emb.shape[0])
    order = rng.permutation(n)
    arrival = np.empty(n)
    arrival[order] = np.arange(n) / params.arrival_rate
    # One fixed audit draw per item, as the real scorer derives it from the item id: re-scoring an item
    # must not re-roll whether it is audited.
    draws: np.ndarray = rng.random(size=n)
    wrong_shift: np.ndarray = rng.integers(
        1, k, size=n
    )  # used when an annotator errs: a uniformly wrong class
    errs: np.ndarray = rng.random(size=n) < params.annotator_error

    clf = CentroidClassifier(label_emb, config)
    zero_shot_pred = clf.predict_proba(emb).argmax(axis=1)

    final = np.full(n, -1, dtype=np.int64)
    source = np.zeros(n, dtype=np.int8)  # 1 = auto, 2 = human review, 3 = human audit
    waiting_kind: dict[int, DecisionKind] = {}
    priority = np.zeros(n)
    version = np.zeros(n, dtype=np.int64)  # invalidates stale heap entries after re-prioritizing
    heap: list[tuple[float, float, int, int]] = []
    human_idx: list[int] = []
    human_lbl: list[int] = []
    threshold: float | None = None
    thresholds: list[float | None] = []
    refits = 0
    labels_since_refit = 0
    last_refit_t = 0.0

    def push(i: int, prio: float) -> None:
        version[i] += 1
        priority[i] = prio
        heapq.heappush(heap, (-prio, arrival[i], int(version[i]), i))

    def apply(idx: np.ndarray, rescoring: bool) -> None:
        if idx.size == 0:
            return
        decisions = decide(clf.predict_proba(emb[idx]), threshold, draws[idx], config)
        for i, d in zip(idx.tolist(), decisions, strict=True):
            if d.kind is DecisionKind.AUTO:
                final[i] = d.label
                source[i] = 1
                waiting_kind.pop(i, None)
                version[i] += 1  # withdraw from the queue
            elif rescoring and waiting_kind.get(i) is DecisionKind.AUDIT:
                continue
            else:
                waiting_kind[i] = d.kind
                push(i, d.priority)

    def refit(now: float) -> None:
        nonlocal threshold, refits, labels_since_refit, last_refit_t
        threshold = calibrate(clf, emb[human_idx], np.asarray(human_lbl), config)
        refits += 1
        thresholds.append(threshold)
        labels_since_refit = 0
        last_refit_t = now
        waiting = np.fromiter(
            (i for i, kd in waiting_kind.items() if kd is DecisionKind.REVIEW), dtype=np.int64
        )
        apply(waiting, rescoring=True)

    next_arrival = 0
    t = 0.0
    service = 1.0 / params.annotator_rate
    annotator_free_at = 0.0
    while (final < 0).any():
        # Next event: an arrival, or the annotators taking the highest-priority task (one server at the
        # total rate; the label is counted when taken, i.e. up to 1/rate early).
        t_arr = arrival[order[next_arrival]] if next_arrival < n else np.inf
        t_ann = max(annotator_free_at, t) if waiting_kind else np.inf
        if t_arr <= t_ann:
            t = float(t_arr)
            batch_end = next_arrival
            while batch_end < n and arrival[order[batch_end]] <= t:
                batch_end += 1
            apply(order[next_arrival:batch_end], rescoring=False)
            next_arrival = batch_end
        else:
            t = float(t_ann)
            while heap and heap[0][2] != version[heap[0][3]]:
                heapq.heappop(heap)
            _, _, _, i = heapq.heappop(heap)
            kind = waiting_kind.pop(i)
            lbl = int(gold[i])
            if errs[i]:
                lbl = int((lbl + wrong_shift[i]) % k)
            final[i] = lbl
            source[i] = 3 if kind is DecisionKind.AUDIT else 2
            human_idx.append(i)
            human_lbl.append(lbl)
            labels_since_refit += 1
            annotator_free_at = t + service
        if labels_since_refit >= params.refit_every or (
            labels_since_refit > 0 and t - last_refit_t >= params.refit_seconds
        ):
            refit(t)

    auto = source == 1
    return SimResult(
        n=n,
        zero_shot_accuracy=float((zero_shot_pred == gold).mean()),
        final_accuracy=float((final == gold).mean()),
        human_share=float((source >= 2).mean()),
        auto_accepted=int(auto.sum()),
        auto_accuracy=float((final[auto] == gold[auto]).mean()) if auto.any() else float("nan"),
        audits=int((source == 3).sum()),
        refits=refits,
        duration_s=t,
        final_threshold=threshold,
        thresholds=thresholds,
    )


def load_corpus(jsonl: Path | None, labels_file: Path | None) -> Corpus:
    if jsonl is None:
        from services.cli.bbc import BBC_LABELS, load_bbc

        items = load_bbc()
        names = list(BBC_LABELS)
        descriptions = BBC_LABELS
        ids, texts, raw = [it.id for it in items], [it.text for it in items], [it.label for it in items]
    else:
        rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
        ids = [str(r.get("id", n)) for n, r in enumerate(rows)]
        texts = [str(r["text"]) for r in rows]
        raw = [str(r["label"]) for r in rows]
        descriptions = json.loads(labels_file.read_text(encoding="utf-8")) if labels_file else {}
        names = sorted(set(raw) | set(descriptions))
    index = {name: c for c, name in enumerate(names)}
    return Corpus(
        ids=ids,
        texts=texts,
        gold=np.array([index[r] for r in raw], dtype=np.int64),
        labels=[(name, str(descriptions.get(name, ""))) for name in names],
    )


def embeddings(corpus: Corpus, cache: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """Item and label embeddings; item embeddings are cached (keyed by a digest of the texts)."""
    from services.inference.minilm import MiniLMLabeler

    labeler = MiniLMLabeler()
    digest = hashlib.sha256((labeler.model_id + "\0" + "\0".join(corpus.texts)).encode("utf-8")).hexdigest()
    key_file = cache.with_suffix(cache.suffix + ".key") if cache else None
    if cache and key_file and cache.exists() and key_file.exists() and key_file.read_text() == digest:
        emb = np.load(cache)
    else:
        emb = labeler.embed(corpus.texts)
        if cache and key_file:
            np.save(cache, emb)
            key_file.write_text(digest)
    return emb, labeler.embed_labels(corpus.labels)


def _fmt(x: float | None) -> str:
    return "none" if x is None else f"{x:.4f}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jsonl", type=Path, help="JSONL with text and label fields (default: BBC demo corpus)")
    ap.add_argument("--labels", type=Path, help="JSON object label -> description (with --jsonl)")
    ap.add_argument("--cache", type=Path, help="embedding cache file (.npy)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--arrival-rate", type=float, default=SimParams.arrival_rate)
    ap.add_argument("--annotator-rates", type=float, nargs="+", default=[SimParams.annotator_rate])
    ap.add_argument("--annotator-error", type=float, default=SimParams.annotator_error)
    ap.add_argument("--refit-every", type=int, default=SimParams.refit_every)
    ap.add_argument("--refit-seconds", type=float, default=SimParams.refit_seconds)
    defaults = PolicyConfig()
    for name in ("target_accuracy", "audit_rate", "z", "temperature", "prior_weight"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    for name in ("min_human_labels", "min_support"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    args = ap.parse_args(argv)

    config = replace(
        defaults,
        target_accuracy=args.target_accuracy,
        audit_rate=args.audit_rate,
        z=args.z,
        temperature=args.temperature,
        prior_weight=args.prior_weight,
        min_human_labels=args.min_human_labels,
        min_support=args.min_support,
    )
    corpus = load_corpus(args.jsonl, args.labels)
    emb, label_emb = embeddings(corpus, args.cache)
    print(f"items={len(corpus.texts)} classes={len(corpus.labels)} {config}")
    print(
        "seed  ann/s  zero-shot  final-acc  human-share  auto-n  auto-acc  audits  refits  sim-s  threshold"
    )
    ok = True
    for seed in args.seeds:
        for rate in args.annotator_rates:
            params = SimParams(
                seed=seed,
                arrival_rate=args.arrival_rate,
                annotator_rate=rate,
                annotator_error=args.annotator_error,
                refit_every=args.refit_every,
                refit_seconds=args.refit_seconds,
            )
            r = simulate(emb, corpus.gold, label_emb, config, params)
            ok &= r.auto_accepted == 0 or r.auto_accuracy >= config.target_accuracy
            print(
                f"{seed:4d}  {rate:5.1f}  {r.zero_shot_accuracy:9.4f}  {r.final_accuracy:9.4f}  "
                f"{r.human_share:11.4f}  {r.auto_accepted:6d}  {r.auto_accuracy:8.4f}  {r.audits:6d}  "
                f"{r.refits:6d}  {r.duration_s:5.0f}  {_fmt(r.final_threshold)}"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
