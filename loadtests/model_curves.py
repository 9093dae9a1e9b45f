"""How accurate the scorer's model is on random labels, per L2 penalty and with the one it chooses.

Fits services.scorer.policy.model.LRClassifier (the scorer's own model) on `n` labels drawn at
random from a benchmark pool (embeddings and zero-shot from the real CPU labeler, cached as in
loadtests.al_offline) and scores the rest of the pool: accuracy, and the accuracy of its most
confident half (what automatic acceptance draws on). Each fixed penalty of `--l2`, and `chosen`:
the penalty the model picks by out-of-fold log-loss (LRPolicyConfig.l2_grid, policy.model.choose_fit).

`oracle T`: with the chosen penalty, the smallest human share (the `n` labels plus the least
confident rest, people erring at --annotator-error) at which the dataset would reach target T if
one knew how many of the model's labels above each confidence are wrong. No certificate can do
better with this model and ranking: it is the floor under the cost of `tandem bench labeling`.

Usage:
    python -m loadtests.model_curves --dataset ag_news --dataset clinc150 --labels 300 1000 --seeds 2
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np

from loadtests.al_offline import BUILTIN, builtin_pool, encode
from services.inference.encoders import ENCODERS, MINILM
from services.scorer.policy.features import features
from services.scorer.policy.model import LRClassifier, LRPolicyConfig


def scores(clf: LRClassifier, X: np.ndarray, gold: np.ndarray) -> tuple[float, float]:
    """(accuracy, accuracy of the most confident half) on these rows."""
    p = clf.predict_proba(X)
    right = p.argmax(axis=1) == gold
    top = np.argsort(-p.max(axis=1), kind="stable")[: max(len(gold) // 2, 1)]
    return float(right.mean()), float(right[top].mean())


def self_train(
    clf: LRClassifier, X: np.ndarray, y: np.ndarray, unlabeled: np.ndarray, threshold: float, rounds: int
) -> None:
    """Refit `rounds` times with the unlabeled rows the model predicts at or above `threshold` as
    pseudo-labels (LRClassifier.fit's `pseudo`, weighted by config.pseudo_label_weight)."""
    for _ in range(rounds):
        p = clf.predict_proba(unlabeled)
        sure = p.max(axis=1) >= threshold
        clf.fit(X, y, pseudo=(unlabeled[sure], p[sure].argmax(axis=1)))


def oracle_share(
    conf: np.ndarray, right: np.ndarray, labeled: int, target: float, annotator_error: float
) -> float:
    """Smallest human share with the most confident m of the rest automatic and the dataset at
    `target`: automatic errors plus people's expected errors within (1 - target) of the pool."""
    total = labeled + conf.size
    wrong = np.concatenate([[0.0], np.cumsum(~right[np.argsort(-conf, kind="stable")])])
    m = np.arange(conf.size + 1)
    fits = wrong + annotator_error * (total - m) <= (1.0 - target) * total
    best = int(m[fits].max()) if fits.any() else 0
    return (total - best) / total


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", action="append", choices=BUILTIN, required=True)
    ap.add_argument("--labels", type=int, nargs="+", default=[300, 1000], help="random labels to fit on")
    ap.add_argument("--seeds", type=int, default=2, help="draws of the labels per size")
    ap.add_argument("--l2", type=float, nargs="*", default=[0.001, 0.01, 0.1, 0.3], help="fixed penalties")
    ap.add_argument("--targets", type=float, nargs="*", default=[0.95, 0.98], help="oracle human share at")
    ap.add_argument("--annotator-error", type=float, default=0.02)
    ap.add_argument(
        "--self-train",
        type=float,
        nargs="*",
        default=[],
        metavar="WEIGHT",
        help="also the chosen penalty with self-training at these pseudo-label weights",
    )
    ap.add_argument(
        "--self-train-threshold",
        type=float,
        default=0.98,
        help="pseudo-label unlabeled rows predicted at least this",
    )
    ap.add_argument(
        "--encoder", choices=list(ENCODERS), default=MINILM.name, help="the CPU labeler's sentence model"
    )
    ap.add_argument("--self-train-rounds", type=int, default=2, help="refits on pseudo-labels per fit")
    args = ap.parse_args(argv)
    oracles = "".join(f" {'oracle ' + format(t, 'g'):>11}" for t in args.targets)
    print(
        f"{'dataset':10} {'labels':>6} {'l2':>8} {'accuracy':>9} {'top half':>9}{oracles}  (mean of {args.seeds} seeds)"
    )
    for name in args.dataset:
        pool = builtin_pool(name)
        enc = encode(pool, encoder=args.encoder)
        X, gold = features(enc.emb, enc.zero_shot), pool.gold
        for n in args.labels:
            if n >= len(gold):
                raise SystemExit(f"--labels {n}: the {name} pool has {len(gold)} items")
            rows: dict[str, list[tuple[float, ...]]] = {}
            for seed in range(args.seeds):
                order = np.random.default_rng(seed).permutation(len(gold))
                train, rest = order[:n], order[n:]
                configs = [(f"{v:g}", LRPolicyConfig(l2=v, l2_grid=())) for v in args.l2]
                configs.append(("chosen", LRPolicyConfig()))
                configs += [
                    (
                        f"st {w:g}",
                        LRPolicyConfig(
                            pseudo_label_weight=w, pseudo_label_threshold=args.self_train_threshold
                        ),
                    )
                    for w in args.self_train
                ]
                for key, cfg in configs:
                    clf = LRClassifier(enc.label_emb, cfg)
                    clf.fit(X[train], gold[train])
                    if cfg.pseudo_label_weight > 0:
                        self_train(
                            clf,
                            X[train],
                            gold[train],
                            X[rest],
                            args.self_train_threshold,
                            args.self_train_rounds,
                        )
                    row: tuple[float, ...] = scores(clf, X[rest], gold[rest])
                    if key == "chosen" or key.startswith("st "):
                        key = f"chosen {clf.l2:g} nb {clf.neighbours_weight:g}" if key == "chosen" else key
                        p = clf.predict_proba(X[rest])
                        right = p.argmax(axis=1) == gold[rest]
                        row += tuple(
                            oracle_share(p.max(axis=1), right, n, t, args.annotator_error)
                            for t in args.targets
                        )
                    rows.setdefault(key, []).append(row)
            for key, vals in rows.items():
                mean = np.mean(vals, axis=0)
                extra = "".join(f" {v:11.3f}" for v in mean[2:]) or " " * (12 * len(args.targets))
                print(
                    f"{name:10} {n:6d} {key:>8} {mean[0]:9.4f} {mean[1]:9.4f}{extra}  ({len(vals)} seeds)",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
