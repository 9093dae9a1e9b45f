"""Offline active-learning simulation over a labeled JSONL pool, with two baselines in the same run.

Embeddings and the zero-shot distribution come from the real CPU labeler (MiniLMLabeler), cached under
/tmp. Simulated annotators (error rate e, a wrong label drawn uniformly from the other classes) label
the highest-priority waiting items, refit_every labels at a time; after each batch the model is refit,
waiting items are re-scored and those clearing the threshold are auto-accepted (frozen with the label
they had then). Items arrive all at once (pool) or arrival_ratio items per human label (stream).

Because the policy does not look at the budget, a run with a human budget B is identical to the
unbudgeted run up to the moment B labels exist, and then finalizes open items with the model's label.
So one run gives the whole budget sweep: after every batch the pool accuracy of "final labels so far +
current model label for open items" is recorded against the human share, and figures at a share are
interpolated from that curve (``--check-budget`` replays a truly budgeted run to confirm).

Baselines, same pool, same seeds:
- labeler only: zero-shot argmax for every item (human share 0);
- random review: people label random items at the same budget, the same classifier labels the rest.

Usage:
    python -m loadtests.al_offline --dataset banking77 --repeat 3
    python -m loadtests.al_offline --jsonl pool.jsonl --descriptions labels.yaml --target 0.98
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import yaml
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from services.scorer.policy.centroids import CentroidClassifier, PolicyConfig, calibrate, decide, label_issues
from services.scorer.policy.model import (
    HumanBudget,
    LRClassifier,
    LRPolicyConfig,
    features,
    finalize_remaining,
    route,
    threshold_in_force,
)
from services.scorer.policy.model import calibrate as calibrate_lr
from services.scorer.service import LABEL_AUDIT_MIN_CONFIDENCE, LABEL_AUDIT_MIN_LABELS

# The shared datasets sit beside the repository (../shared/datasets); TANDEM_DATASETS overrides.
DATASETS = Path(
    os.environ.get("TANDEM_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets")
)
DESCRIPTIONS = Path(__file__).resolve().parent / "descriptions"
CACHE = Path(tempfile.gettempdir()) / "tandem_al"
SHARES = (0.05, 0.10, 0.15, 0.20, 0.30, 0.40)
GOALS = (0.95, 0.98)


@dataclass(frozen=True)
class Pool:
    name: str
    texts: list[str]
    gold: np.ndarray  # class indices
    labels: list[tuple[str, str]]  # (name, description) per class index


@dataclass(frozen=True)
class Encoded:
    emb: np.ndarray  # (n, d) float32, L2-normalized
    label_emb: np.ndarray  # (k, d)
    zero_shot: np.ndarray  # (n, k) labeler probabilities


def _read_jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_descriptions(path: Path) -> dict[str, str]:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        # YAML reads bare yes/no/true keys as booleans: such label names must be quoted.
        raise ValueError(f"{path}: expected a mapping of label name (string) -> description")
    return {k: str(v) for k, v in raw.items()}


def make_pool(name: str, rows: list[dict[str, object]], descriptions: dict[str, str]) -> Pool:
    texts = [str(r["text"]) for r in rows]
    raw = [str(r["label"]) for r in rows]
    names = sorted(set(raw) | set(descriptions))
    index = {n: c for c, n in enumerate(names)}
    return Pool(
        name=name,
        texts=texts,
        gold=np.array([index[r] for r in raw], dtype=np.int64),
        labels=[(n, descriptions.get(n, "")) for n in names],
    )


def builtin_pool(name: str, ag_news_size: int = 5000, ag_news_seed: int = 0) -> Pool:
    """The benchmark pools of the active-learning issue, read from the shared datasets folder."""
    desc = read_descriptions(DESCRIPTIONS / f"{name}.yaml")
    if name == "ag_news":
        rows = _read_jsonl(DATASETS / "ag_news" / "test.jsonl")
        pick = np.sort(np.random.default_rng(ag_news_seed).choice(len(rows), ag_news_size, replace=False))
        rows = [rows[i] for i in pick.tolist()]
    elif name == "sms_spam":
        # 403 texts occur more than once; one copy each, so no item is trivially answered by its twin.
        seen: set[str] = set()
        rows = []
        for r in _read_jsonl(DATASETS / "sms_spam" / "data.jsonl"):
            if str(r["text"]) not in seen:
                seen.add(str(r["text"]))
                rows.append(r)
    elif name == "banking77":
        rows = _read_jsonl(DATASETS / "banking77" / "test.jsonl")
    elif name == "clinc150":
        rows = [r for r in _read_jsonl(DATASETS / "clinc150" / "test.jsonl") if r["label"] != "oos"]
    else:
        raise ValueError(f"unknown dataset {name!r}")
    return make_pool(name, rows, desc)


def _digest(parts: Sequence[str]) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:24]


def encode(pool: Pool, cache: Path = CACHE, temperature: float = 0.05) -> Encoded:
    """Embeddings of the pool texts and label texts, cached by content; zero-shot is recomputed from them
    exactly as MiniLMLabeler.zero_shot does (it is a pure function of the two embeddings)."""
    from services.inference.minilm import MODEL_NAME, WEIGHTS_SHA256, label_texts, softmax_scores

    model_id = f"{MODEL_NAME}@{WEIGHTS_SHA256[:12]}"
    uniq = sorted(set(pool.texts))
    ltexts = label_texts(pool.labels)
    cache.mkdir(parents=True, exist_ok=True)
    item_file = cache / f"items-{_digest([model_id, *uniq])}.npy"
    label_file = cache / f"labels-{_digest([model_id, *ltexts])}.npy"
    labeler = None
    if not item_file.exists() or not label_file.exists():
        from services.inference.minilm import MiniLMLabeler

        labeler = MiniLMLabeler(torch_threads=1)
        if labeler.model_id != model_id:
            raise RuntimeError(f"labeler is {labeler.model_id}, cache keys assume {model_id}")
    if not item_file.exists():
        assert labeler is not None
        np.save(item_file, labeler.embed(uniq))
    if not label_file.exists():
        assert labeler is not None
        np.save(label_file, labeler.embed(ltexts))
    uniq_emb = np.load(item_file)
    row = {t: i for i, t in enumerate(uniq)}
    emb = uniq_emb[[row[t] for t in pool.texts]]
    label_emb = np.load(label_file)
    zs = softmax_scores(emb @ label_emb.T, temperature)
    return Encoded(emb=emb, label_emb=label_emb, zero_shot=zs)


@dataclass(frozen=True)
class SimParams:
    seed: int = 0
    annotator_error: float = 0.02
    refit_every: int = 10
    # Batch between refits grows to this share of the labels so far (0: always refit_every). The scorer
    # refits every ~10 labels; growing batches only make the simulation cheaper on big pools, and can
    # only make the policy look worse (staler model), never better.
    refit_growth: float = 0.0
    # Items arriving per human label; 0 = the whole pool is there from the start.
    arrival_ratio: float = 0.0
    # Stop once people have labeled this share (open items are then finalized with the model's label).
    max_share: float = 1.0
    budget: HumanBudget | None = None
    # Label-error audit, as the scorer runs it: after each refit up to this many human labels the
    # out-of-fold model contradicts with confidence go to a second person, and a second label that
    # sides with the model replaces the first (0 = off, the harness's behaviour before).
    second_opinions: int = 0


@dataclass
class Curve:
    share: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    completed: bool = False  # every item got a final label before the run stopped

    def add(self, share: float, accuracy: float) -> None:
        self.share.append(share)
        self.accuracy.append(accuracy)

    def at(self, share: float) -> float:
        s, a = np.asarray(self.share), np.asarray(self.accuracy)
        if share > s[-1] + 1e-12:
            # A finished run needs no more labels: a larger budget leaves its accuracy where it is.
            return float(a[-1]) if self.completed else float("nan")
        return float(np.interp(share, s, a))

    def share_for(self, accuracy: float) -> float:
        """Smallest human share at which pool accuracy reaches `accuracy` (linear between batches)."""
        s, a = np.asarray(self.share), np.asarray(self.accuracy)
        hit = np.flatnonzero(a >= accuracy)
        if hit.size == 0:
            return float("nan")
        j = int(hit[0])
        if j == 0:
            return float(s[0])
        frac = (accuracy - a[j - 1]) / max(a[j] - a[j - 1], 1e-12)
        return float(s[j - 1] + frac * (s[j] - s[j - 1]))


@dataclass
class SimResult:
    curve: Curve
    human_share: float  # when the run ended
    completed: bool  # every item final without hitting max_share or the budget
    final_accuracy: float
    auto_n: int
    auto_accuracy: float
    audits: int
    below_target_n: int  # items finalized by the model after the budget ran out, under the threshold
    refits: int
    seconds: float
    thresholds: list[float | None] = field(default_factory=list)


class _Model:
    """The two policies behind one interface: fit + threshold, probabilities, routing."""

    def __init__(self, kind: str, enc: Encoded, cfg: LRPolicyConfig) -> None:
        self.kind = kind
        self.cfg = cfg
        self.X = features(enc.emb, enc.zero_shot) if kind == "lr" else np.asarray(enc.emb, np.float64)
        if kind == "lr":
            self.lr = LRClassifier(enc.label_emb, cfg)
        else:
            # The shipped policy as it is: its own defaults, only the target taken from the run.
            self.ccfg = replace(PolicyConfig(), target_accuracy=cfg.target_accuracy)
            self.cent = CentroidClassifier(enc.label_emb, self.ccfg)
            self.cent.fit(np.zeros((0, enc.emb.shape[1])), np.zeros(0, dtype=np.int64))

    def refit(
        self,
        idx: np.ndarray,
        y: np.ndarray,
        sel: np.ndarray,
        calibrate_too: bool,
        unlabeled: np.ndarray,
        unlabeled_probs: np.ndarray,
    ) -> float | None:
        if self.kind == "lr":
            pseudo = None
            if self.cfg.pseudo_label_weight > 0:
                conf = unlabeled_probs.max(axis=1)
                keep = conf >= self.cfg.pseudo_label_threshold
                pseudo = (self.X[unlabeled[keep]], unlabeled_probs[keep].argmax(axis=1))
            if not calibrate_too:
                self.lr.fit(self.X[idx], y, pseudo=pseudo)
                return None
            # As in the scorer, a random draw (warm-up, sample, audit) picked the rows people did not
            # get for their ambiguity (selection probability 1).
            return calibrate_lr(
                self.lr, self.X[idx], y, self.cfg, selection_prob=sel, pseudo=pseudo, random=sel < 1.0
            )
        if not calibrate_too:
            self.cent.fit(self.X[idx], y)
            return None
        return calibrate(self.cent, self.X[idx], y, self.ccfg)

    def proba(self, idx: np.ndarray) -> np.ndarray:
        if self.kind == "lr":
            return self.lr.predict_proba(self.X[idx])
        return self.cent.predict_proba(self.X[idx])

    def route(
        self, probs: np.ndarray, threshold: float | None, draws: np.ndarray, n_labels: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(kind codes 0 auto / 1 review / 2 audit, labels, priority)."""
        if self.kind == "lr":
            r = route(probs, threshold, draws, n_labels, self.cfg)
            return r.kind, r.label, r.priority
        ds = decide(probs, threshold, draws, self.ccfg)
        code = {"auto": 0, "review": 1, "audit": 2}
        return (
            np.array([code[d.kind.value] for d in ds], dtype=np.int8),
            np.array([d.label for d in ds], dtype=np.int64),
            np.array([d.priority for d in ds]),
        )


def simulate(
    enc: Encoded, gold: np.ndarray, policy: str, cfg: LRPolicyConfig, params: SimParams
) -> SimResult:
    """policy: 'lr' (policy_lr), 'centroid' (policy.py), or 'random-lr' / 'random-centroid' (people label
    random items, no auto-accept: the random-review baseline)."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(params.seed)
    n, k = int(enc.emb.shape[0]), int(enc.label_emb.shape[0])
    random_review = policy.startswith("random-")
    model = _Model(policy.removeprefix("random-"), enc, cfg)
    order = rng.permutation(n)
    draws = rng.random(n)
    wrong_shift = rng.integers(1, max(k, 2), size=n)
    errs = rng.random(n) < params.annotator_error
    human = np.where(errs, (gold + wrong_shift) % k, gold)
    # As in the scorer: one draw picks the random sample before a threshold exists, an independent
    # one the audits after, and an item once held for people stays with them.
    audit_draws = rng.random(n)
    held = np.zeros(n, dtype=bool)
    # Second opinions draw from their own stream, so switching them on leaves every other draw alone.
    second_rng = np.random.default_rng(params.seed + 1_000_003)
    asked = np.zeros(n, dtype=bool)

    final = np.full(n, -1, dtype=np.int64)
    source = np.zeros(n, dtype=np.int8)  # 1 auto, 2 review, 3 audit / random sample
    labeled: list[int] = []
    sel_prob: list[float] = []
    threshold: float | None = None
    thresholds: list[float | None] = []
    estimates: list[float | None] = []
    curve = Curve()
    limit = params.budget.limit(n) if params.budget else n
    limit = min(limit, int(np.ceil(params.max_share * n)))
    arrived = n if params.arrival_ratio <= 0 else 0
    refits = 0
    probs = model.proba(np.arange(n))
    curve.add(0.0, float((probs.argmax(axis=1) == gold).mean()))

    while True:
        if params.arrival_ratio > 0:
            arrived = min(n, max(arrived, int(params.arrival_ratio * len(labeled)) + params.refit_every))
        avail = order[:arrived]
        waiting = avail[final[avail] < 0]
        if waiting.size == 0 and arrived >= n:
            break
        # Score and route waiting items with the current model.
        p = probs[waiting]
        if random_review:
            kinds = np.ones(waiting.size, dtype=np.int8)
            prio = draws[waiting]
        else:
            u = (draws if threshold is None else audit_draws)[waiting]
            kinds, lbls, prio = model.route(p, threshold, u, len(labeled))
            was_held = held[waiting]
            kinds = np.where(was_held, np.int8(2), kinds)
            prio = np.where(was_held, cfg.audit_priority, prio)
            held[waiting[kinds == 2]] = True
            auto = kinds == 0
            final[waiting[auto]] = lbls[auto]
            source[waiting[auto]] = 1
            waiting, kinds, prio = waiting[~auto], kinds[~auto], prio[~auto]
        if waiting.size == 0:
            if arrived >= n:
                break
            continue
        if len(labeled) >= limit:
            break
        batch = max(params.refit_every, int(params.refit_growth * len(labeled)))
        take = min(batch, waiting.size, limit - len(labeled))
        top = np.lexsort((draws[waiting], -prio))[:take]
        picked = waiting[top]
        warmup = random_review or len(labeled) < cfg.min_human_labels
        for j, i in zip(top.tolist(), picked.tolist(), strict=True):
            final[i] = human[i]
            is_audit = kinds[j] == 2
            source[i] = 3 if (is_audit or warmup) else 2
            labeled.append(i)
            # Chance of having been picked: a random draw among the waiting items, the audit share, or
            # 1 for an ambiguity-ranked review (it would have been picked by any run in this state).
            sel_prob.append(take / waiting.size if warmup else (cfg.audit_rate if is_audit else 1.0))
        idx = np.asarray(labeled, dtype=np.int64)
        # Self-training candidates: items nobody labeled, with the probabilities of the model before this
        # refit (auto-accepted items included: their frozen labels are model labels too).
        unl = np.flatnonzero(source < 2)
        estimate = model.refit(idx, final[idx], np.asarray(sel_prob), not random_review, unl, probs[unl])
        if params.second_opinions and model.kind == "lr":
            _second_opinions(model.lr, idx, final, asked, gold, second_rng, params, k)
        estimates.append(estimate)
        # The scorer's rule for the LR policy; the centroid policy acts on every estimate.
        threshold = threshold_in_force(estimates, cfg.confirmations) if model.kind == "lr" else estimate
        thresholds.append(threshold)
        refits += 1
        probs = model.proba(np.arange(n))
        pool_labels = np.where(final >= 0, final, probs.argmax(axis=1))
        curve.add(len(labeled) / n, float((pool_labels[avail] == gold[avail]).mean()))

    open_items = np.flatnonzero(final < 0)
    fin = finalize_remaining(probs[open_items], threshold)
    completed = open_items.size == 0
    curve.completed = completed
    final[open_items] = fin.label
    auto_mask = source == 1
    return SimResult(
        curve=curve,
        human_share=len(labeled) / n,
        completed=completed,
        final_accuracy=float((final == gold).mean()),
        auto_n=int(auto_mask.sum()),
        auto_accuracy=float((final[auto_mask] == gold[auto_mask]).mean())
        if auto_mask.any()
        else float("nan"),
        audits=int((source == 3).sum()),
        below_target_n=int(fin.below_target.sum()),
        refits=refits,
        seconds=time.perf_counter() - t0,
        thresholds=thresholds,
    )


def _second_opinions(
    lr: LRClassifier,
    idx: np.ndarray,
    final: np.ndarray,
    asked: np.ndarray,
    gold: np.ndarray,
    rng: np.random.Generator,
    params: SimParams,
    k: int,
) -> None:
    """The scorer's label-error audit (ProjectModel.label_issues + the consensus rule), in place on
    `final`: the corrected labels train the next refit."""
    if idx.size < LABEL_AUDIT_MIN_LABELS:
        return
    oof = lr.oof_proba()
    fitted = idx[: oof.shape[0]]
    suspects = [
        r
        for r in label_issues(oof, final[fitted], LABEL_AUDIT_MIN_CONFIDENCE).tolist()
        if not asked[fitted[r]]
    ][: params.second_opinions]
    for r in suspects:
        item = int(fitted[r])
        asked[item] = True
        wrong = rng.random() < params.annotator_error
        second = int((gold[item] + rng.integers(1, max(k, 2))) % k) if wrong else int(gold[item])
        if second != final[item] and second == int(oof[r].argmax()):
            final[item] = second


def _mean(xs: Sequence[float]) -> float:
    """Mean over the values that exist (NaN: a seed that never got there)."""
    vals = [x for x in xs if not np.isnan(x)]
    return float(np.mean(vals)) if vals else float("nan")


def _pct(x: float) -> str:
    return "  n/a " if np.isnan(x) else f"{100 * x:5.1f}%"


def report(name: str, zs_acc: float, rows: dict[str, list[SimResult]], target: float) -> str:
    head = "policy".ljust(16) + "".join(f"@{int(100 * s):>2d}%  " for s in SHARES)
    head += " for95%  for98%  auto-n  auto-acc  end-share  done  sec"
    lines = [f"== {name}  target={target}  labeler-only accuracy={_pct(zs_acc)}", head]
    for pol, results in rows.items():
        at = [_mean([r.curve.at(s) for r in results]) for s in SHARES]
        need = [_mean([r.curve.share_for(g) for r in results]) for g in GOALS]
        miss = [sum(np.isnan(r.curve.share_for(g)) for r in results) for g in GOALS]
        auto_n = np.mean([r.auto_n for r in results])
        auto_acc = _mean([r.auto_accuracy for r in results])
        worst = min((r.auto_accuracy for r in results if r.auto_n), default=float("nan"))
        line = pol.ljust(16) + "".join(f"{_pct(a)} " for a in at)
        line += "".join(f" {_pct(x)}" + ("*" if m else " ") for x, m in zip(need, miss, strict=True))
        line += f" {auto_n:6.0f}  {_pct(auto_acc)}({_pct(worst).strip()})  {_pct(_mean([r.human_share for r in results]))}"
        line += f"  {sum(r.completed for r in results)}/{len(results)}  {np.mean([r.seconds for r in results]):4.0f}"
        lines.append(line)
    lines.append(
        "(* = not reached in some seeds: mean over seeds that reached it; auto-acc = mean(worst seed))"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["ag_news", "sms_spam", "banking77", "clinc150"], action="append")
    ap.add_argument("--jsonl", type=Path, help="any JSONL pool with text and label fields")
    ap.add_argument("--descriptions", type=Path, help="YAML label -> description (with --jsonl)")
    ap.add_argument("--policies", nargs="+", default=["lr", "centroid", "random-lr"])
    ap.add_argument("--target", type=float, nargs="+", default=[0.95])
    ap.add_argument("--annotator-error", type=float, default=0.02, help="simulated annotators' error rate")
    ap.add_argument(
        "--assumed-error",
        type=float,
        default=0.0,
        help="annotator error the policy assumes when translating the target (0.0 = conservative)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="seeds 0..repeat-1")
    ap.add_argument("--refit-every", type=int, default=10)
    ap.add_argument("--refit-growth", type=float, default=0.0)
    ap.add_argument("--arrival-ratio", type=float, default=0.0)
    ap.add_argument("--max-share", type=float, default=0.6)
    ap.add_argument("--check-budget", type=float, help="also replay a run with this budget share")
    ap.add_argument(
        "--second-opinions",
        type=int,
        default=0,
        help="label-error audit: second opinions per refit (scorer: 5)",
    )
    ap.add_argument("--set", nargs="*", default=[], help="LRPolicyConfig overrides, e.g. l2=0.1 folds=5")
    args = ap.parse_args(argv)

    overrides: dict[str, object] = {}
    for kv in args.set:
        key, val = kv.split("=", 1)
        cur = getattr(LRPolicyConfig(), key)
        overrides[key] = (val.lower() in ("1", "true", "yes")) if isinstance(cur, bool) else type(cur)(val)
    pools: list[Pool] = []
    if args.jsonl:
        desc = read_descriptions(args.descriptions) if args.descriptions else {}
        pools.append(make_pool(args.jsonl.stem, _read_jsonl(args.jsonl), desc))
    pools += [builtin_pool(d) for d in args.dataset or []]
    ok = True
    # One BLAS thread: the fits are small, and these machines are shared.
    threadpool_limits(1)
    for pool in pools:
        enc = encode(pool)
        zs_acc = float((enc.zero_shot.argmax(axis=1) == pool.gold).mean())
        for target in args.target:
            cfg = replace(LRPolicyConfig(), target_accuracy=target, annotator_error=args.assumed_error)
            cfg = replace(cfg, **overrides)  # type: ignore[arg-type]
            rows: dict[str, list[SimResult]] = {}
            for pol in args.policies:
                rows[pol] = []
                for seed in range(args.repeat):
                    params = SimParams(
                        seed=seed,
                        annotator_error=args.annotator_error,
                        refit_every=args.refit_every,
                        refit_growth=args.refit_growth,
                        arrival_ratio=args.arrival_ratio,
                        max_share=args.max_share,
                        second_opinions=args.second_opinions,
                    )
                    r = simulate(enc, pool.gold, pol, cfg, params)
                    rows[pol].append(r)
                    if r.auto_n and not pol.startswith("random-"):
                        ok &= r.auto_accuracy >= target
                    if args.check_budget is not None:
                        b = simulate(
                            enc, pool.gold, pol, cfg, replace(params, budget=HumanBudget(args.check_budget))
                        )
                        print(
                            f"  budget check {pol} seed={seed}: curve@{args.check_budget:.2f}="
                            f"{r.curve.at(args.check_budget):.4f} budgeted run={b.final_accuracy:.4f} "
                            f"below-target finalized={b.below_target_n}",
                            flush=True,
                        )
            print(report(pool.name, zs_acc, rows, target), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
