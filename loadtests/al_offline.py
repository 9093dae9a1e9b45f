"""Offline active-learning simulation that drives the scorer's own ProjectModel over a labeled pool.

Every simulation runs services.scorer.service.ProjectModel, the class the scorer service runs: items
arrive (``decide``, ``seen``), simulated people label the highest-priority waiting items, labels go in
(``add_labels``; audits that disagree with the model go to a second simulated person,
``record_second_opinion``), the model is refit (``refit``), the waiting items are re-scored
(``rescore``: new priorities, proposals for automatic acceptance, accepted batches), and at the end
the certificate (``certificate``) says what the final dataset is certified to.

Embeddings and the zero-shot distribution come from the real CPU labeler (SentenceLabeler, MiniLM
unless ``--encoder mpnet``), cached under /tmp/tandem_al. Simulated annotators err at rate e (a wrong
label uniform over the other classes). People's queue is served audits first (proposed items drawn
for an audit, priority routing.AUDIT_PRIORITY and above every ambiguity), then by the priority ProjectModel gave each item;
proposed items that were not audited wait for their batch's certificate and leave people's queue,
and come back to it if their batch is handed back (then ahead of everything but audits,
routing.HANDED_BACK_PRIORITY). Optionally the scorer's confident-learning second opinions run after
each refit (``--second-opinions``, ProjectModel.label_issues; the scorer asks 5 per refit, the
harness none unless told: each costs out-of-fold refits).

Refits: the scorer refits about every 10 labels (``--refit-every 10``). Simulations may instead let
the batch between refits grow with the labels so far (``--refit-growth 0.2``: refit after
max(refit_every, 20% of the labels so far) new labels): far fewer refits on big pools, a staler
model between them (so more human labels than the scorer needs, never a different certificate
rule). ``--validity`` uses growing batches (0.2 unless ``--refit-growth`` says otherwise).

Items arrive all at once before the first label (pool; ``seen`` is the whole pool) or
``--arrival-ratio`` items per human label (stream). A human budget (``--budget-share``,
``--budget-items``; policy.budget.HumanBudget) stops people: the pending proposals are settled
(``settle``) and every item still open gets the model's label (``finalize``, counted in
``model_labeled``), as the scorer does.

Usage:
    python -m loadtests.al_offline --dataset banking77 --target 0.95 0.98
    python -m loadtests.al_offline --jsonl pool.jsonl --descriptions labels.yaml --target 0.98
    python -m loadtests.al_offline --validity --seeds 200 --workers 2 --max-minutes 60

``--validity`` checks the dataset guarantee over many seeds: the four datasets, targets 0.95 and
0.98, and five conditions (normal; an overconfident labeler; weak features; streaming arrivals;
people whose errors follow the model's wrong labels, against the independence a blind project's
checks assume, ``--blind``),
each seed a random subsample of the dataset (``--pool-size``, 1,500 items) with its own condition
draws, annotator noise and audit draws (item ids carry the seed). Defaults: refit growth 0.2, stream
arrival ratio 3 items per human label, no confident-learning second opinions, one BLAS thread per
process. The figures: the share of runs whose final dataset accuracy (against gold) reaches the
target, the share certified at the end, and the share certified yet below the target (at most
about delta if the certificate is valid). Runs where the model cannot reach the target still count
(people label the rest): with people erring at 2%, a 0.98 target is then a coin flip.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import yaml
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from services.common.projects import LabelSpec, ProjectSpec
from services.inference.encoders import ENCODERS, MINILM
from services.scorer.policy.features import features
from services.scorer.policy.model import LRPolicyConfig
from services.scorer.policy.routing import HANDED_BACK_PRIORITY
from services.scorer.service import ProjectModel

# The shared datasets sit beside the repository (../shared/datasets); TANDEM_DATASETS overrides.
DATASETS = Path(
    os.environ.get("TANDEM_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets")
)
DESCRIPTIONS = Path(__file__).resolve().parent / "descriptions"
CACHE = Path(tempfile.gettempdir()) / "tandem_al"
BUILTIN = ("ag_news", "sms_spam", "banking77", "clinc150")


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


def encode(pool: Pool, cache: Path = CACHE, temperature: float = 0.05, encoder: str = "minilm") -> Encoded:
    """Embeddings of the pool texts and label texts from the named sentence model, cached by content;
    zero-shot is recomputed from them exactly as SentenceLabeler.zero_shot does (it is a pure function
    of the two embeddings)."""
    from services.inference.encoders import encoder_named
    from services.inference.sentence_labeler import label_texts, softmax_scores

    spec = encoder_named(encoder)
    model_id = spec.model_id()
    uniq = sorted(set(pool.texts))
    ltexts = label_texts(pool.labels)
    cache.mkdir(parents=True, exist_ok=True)
    item_file = cache / f"items-{_digest([model_id, *uniq])}.npy"
    label_file = cache / f"labels-{_digest([model_id, *ltexts])}.npy"
    labeler = None
    if not item_file.exists() or not label_file.exists():
        from services.inference.sentence_labeler import SentenceLabeler

        labeler = SentenceLabeler(encoder=spec, torch_threads=1)
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


def code_version() -> str:
    """The scorer code a run exercised: commit, whether services/scorer has uncommitted changes, and
    a digest of the policy sources (service.py and policy/*.py) as they were read."""
    root = Path(__file__).resolve().parents[1]
    scorer = root / "services" / "scorer"
    files = [scorer / "service.py", *sorted((scorer / "policy").glob("*.py"))]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]

    def git(*cmd: str) -> str:
        try:
            out = subprocess.run(["git", "-C", str(root), *cmd], capture_output=True, text=True, timeout=10)
        except OSError:
            return ""
        return out.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = " + uncommitted changes" if git("status", "--porcelain", "--", "services/scorer") else ""
    return f"code: commit {commit}{dirty} in services/scorer, policy sources sha256 {digest}"


# -- one simulated project ----------------------------------------------------------------------

# Where an item stands in a run.
ABSENT, WAITING, HELD, HUMAN, AUTO, MODEL = range(6)


@dataclass(frozen=True)
class SimParams:
    seed: int = 0
    annotator_error: float = 0.02
    # Refit after `refit_every` new labels, or with refit_growth > 0 after max(refit_every,
    # refit_growth * labels so far). The scorer refits about every 10 labels; growing batches are
    # cheaper and only cost human labels (a staler model), the certificate is the same.
    refit_every: int = 10
    refit_growth: float = 0.0
    # Stream: `arrival_start` items at first, then `arrival_ratio` more per human label (and more
    # whenever people have nothing left to label). 0 = pool: every item there before the first label.
    arrival_ratio: float = 0.0
    arrival_start: int = 50
    # Confident-learning second opinions per refit (ProjectModel.label_issues; the scorer asks 5).
    second_opinions: int = 0
    # People who err pick the model's label where it is wrong (at the same rate e): their errors
    # depend on the model, against what a blind project's checks assume (the "follow-model" stress).
    follow_model: bool = False


@dataclass(frozen=True)
class SimResult:
    items: int
    human: int  # items labeled by people (audits included)
    auto: int  # accepted automatically
    auto_correct: int
    model_labeled: int  # finalized with the model's label once the budget was spent
    final_accuracy: float  # every item's final label against gold
    lower_bound: float  # certified accuracy at the end (dataset, or automatic labels alone)
    certified: bool
    audits: int  # audit labels in
    audit_disagreements: int  # that stood after the second person
    adjudicated: int  # audits that went to a second person
    second_opinions: int  # confident-learning second opinions asked
    relabeled: int  # human labels corrected by a second person siding with the model
    batches: int
    rejected_batches: int
    refits: int
    seconds: float

    @property
    def human_share(self) -> float:
        return self.human / self.items if self.items else 0.0

    @property
    def auto_accuracy(self) -> float:
        return self.auto_correct / self.auto if self.auto else float("nan")


def project_spec(
    name: str,
    labels: Sequence[tuple[str, str]],
    target: float,
    guarantee: str = "dataset",
    human_error: float = 0.02,
    delta: float = 0.05,
    audit_rate: float = 0.0,
    budget_items: int = 0,
    budget_share: float = 0.0,
    blind: bool = False,
) -> ProjectSpec:
    return ProjectSpec(
        project_id=name,
        name=name,
        labels=tuple(LabelSpec(n, d) for n, d in labels),
        instructions="",
        target_accuracy=target,
        audit_rate=audit_rate,
        human_budget_items=budget_items,
        human_budget_share=budget_share,
        guarantee=guarantee,
        delta=delta,
        human_error=human_error,
        hide_suggestions=blind,
    )


def simulate(
    X: np.ndarray,
    label_emb: np.ndarray,
    gold: np.ndarray,
    spec: ProjectSpec,
    cfg: LRPolicyConfig,
    params: SimParams,
) -> SimResult:
    """One project from its first item to its last final label, driven as the scorer drives it.

    X: feature rows (policy.features.features of the embeddings and zero-shot probabilities)."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(params.seed)
    n, k = len(gold), int(label_emb.shape[0])
    model = ProjectModel(spec, label_emb, cfg, second_opinions=params.second_opinions > 0)
    # The audit and order draws are fixed by the item id (proposals.unit_draw): ids carry the seed.
    ids = [f"s{params.seed}-{i}" for i in range(n)]
    row_of = {item_id: i for i, item_id in enumerate(ids)}
    state = np.full(n, ABSENT, dtype=np.int8)
    final = np.full(n, -1, dtype=np.int64)
    prio = np.zeros(n)
    audit = np.zeros(n, dtype=bool)
    tie = rng.random(n)
    stream = params.arrival_ratio > 0
    order = rng.permutation(n) if stream else np.arange(n)
    arrived = 0
    counts = {"adjudicated": 0, "second": 0, "relabeled": 0, "rejected": 0}

    def annotate(i: int, model_label: int | None = None) -> int:
        if k > 1 and rng.random() < params.annotator_error:
            if params.follow_model and model_label is not None and model_label != gold[i]:
                return model_label
            return int((gold[i] + rng.integers(1, k)) % k)
        return int(gold[i])

    def finalize(rows: np.ndarray) -> None:
        if rows.size:
            final[rows] = [label for label, _ in model.finalize(X[rows])]
            state[rows] = MODEL
            model.model_labeled += int(rows.size)

    def arrive(upto: int) -> None:
        nonlocal arrived
        new = order[arrived:upto]
        if new.size == 0:
            return
        arrived = upto
        if model.budget_spent(extra_seen=int(new.size)):
            finalize(new)  # the scorer gives items arriving after the budget the model's label
        else:
            _, _, priority = model.decide(X[new], [ids[i] for i in new.tolist()])
            prio[new] = priority
            state[new] = WAITING
        model.seen += int(new.size)

    def accept(pairs: Sequence[tuple[str, int] | tuple[str, int, float]]) -> None:
        for acc in pairs:
            i = row_of[acc[0]]
            # Unaudited proposals are withheld from people, so an accepted item is still open.
            if state[i] not in (WAITING, HELD):
                raise RuntimeError(f"accepted item {acc[0]} is no longer open (state {state[i]})")
            state[i] = AUTO
            final[i] = acc[1]

    if not stream:
        arrive(n)
    last: tuple[int, ...] = ()
    while True:
        if stream:
            arrive(min(n, max(arrived, params.arrival_start + int(params.arrival_ratio * model.n_labels))))
        queue = np.flatnonzero(state == WAITING)
        held = bool((state == HELD).any())
        if queue.size == 0 and not held:
            if arrived >= n:
                break
            # People have nothing to do: time passes and the next items arrive.
            arrive(min(n, arrived + max(params.refit_every, int(params.arrival_ratio * params.refit_every))))
            continue
        size = max(params.refit_every, int(params.refit_growth * model.n_labels))
        limit = model.budget.limit(model.seen)
        if limit is not None:
            size = min(size, limit - model.n_labels)
        if queue.size and size > 0:
            # Audits first (AUDIT_PRIORITY in the scorer), then the priority the model gave each item.
            pick = queue[np.lexsort((tie[queue], -prio[queue], -audit[queue].astype(np.int8)))[:size]]
            follow = model.predict_proba(X[pick]).argmax(axis=1).tolist() if params.follow_model else None
            labels = np.array(
                [annotate(i, None if follow is None else follow[j]) for j, i in enumerate(pick.tolist())],
                dtype=np.int64,
            )
            state[pick] = HUMAN
            final[pick] = labels
            adjudicate = model.add_labels(X[pick], labels, [ids[i] for i in pick.tolist()])
            for item_id, model_label in adjudicate:
                i = row_of[item_id]
                second = annotate(i, model_label)
                counts["adjudicated"] += 1
                model.record_second_opinion(item_id, second)
                if second == model_label:
                    # Two of three (the model and the second person) against the first label.
                    final[i] = second
                    model.relabel(item_id, second)
        model.refit()
        if params.second_opinions:
            for item_id, suspected, _ in model.label_issues(params.second_opinions):
                i = row_of[item_id]
                model.second_opinion_asked.add(item_id)
                second = annotate(i)
                counts["second"] += 1
                if second != final[i] and second == suspected:
                    final[i] = second
                    model.relabel(item_id, second)
                    counts["relabeled"] += 1
        if model.budget_spent():
            # As the scorer: accept what the certificate allows, the model labels the rest.
            accept(model.settle().accept)
            finalize(np.flatnonzero((state == WAITING) | (state == HELD)))
        else:
            rows = np.flatnonzero(state == WAITING)
            r = model.rescore(X[rows], [ids[i] for i in rows.tolist()], prio[rows])
            for row, p in r.reprioritize:
                prio[rows[row]] = p
            for e in r.proposed:
                i = row_of[e.item_id]
                if e.audited:
                    audit[i] = True
                else:
                    state[i] = HELD  # waits for its batch's certificate, out of people's queue
            accept(r.accept)
            for b in r.rejected_batches:
                counts["rejected"] += 1
                back = [row_of[e.item_id] for e in model.book.batch(b) if not e.audited]
                state[[i for i in back if state[i] == HELD]] = WAITING
            for item_id in r.handed_back:
                prio[row_of[item_id]] = HANDED_BACK_PRIORITY  # people get them right after audits
        now = (model.n_labels, arrived, *np.bincount(state, minlength=6).tolist())
        if now == last:
            raise RuntimeError(f"simulation stalled: {now}")
        last = now

    cert = model.certificate()
    audits, disagreed = model.book.audits()
    auto_mask = state == AUTO
    return SimResult(
        items=n,
        human=int((state == HUMAN).sum()),
        auto=int(auto_mask.sum()),
        auto_correct=int((final[auto_mask] == gold[auto_mask]).sum()),
        model_labeled=int((state == MODEL).sum()),
        final_accuracy=float((final == gold).mean()),
        lower_bound=float(cert.lower_bound),
        certified=bool(cert.met),
        audits=audits,
        audit_disagreements=disagreed,
        adjudicated=counts["adjudicated"],
        second_opinions=counts["second"],
        relabeled=counts["relabeled"],
        batches=len(model.book.batch_state),
        rejected_batches=counts["rejected"],
        refits=model.refits,
        seconds=time.perf_counter() - t0,
    )


# -- validity: many seeds, five conditions -----------------------------------------------------

CONDITIONS = ("normal", "overconfident", "weak-features", "stream", "follow-model")
VALIDITY_TARGETS = (0.95, 0.98)


@dataclass(frozen=True)
class Inputs:
    """What one condition gives the model: embeddings, label embeddings, zero-shot probabilities."""

    emb: np.ndarray
    label_emb: np.ndarray
    zero_shot: np.ndarray


def overconfident(zero_shot: np.ndarray, gold: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A weak, overconfident labeler: the distribution sharpened (p^3, renormalized) and, on 30% of
    the items, its argmax swapped with a random wrong class (same peak confidence, wrong label)."""
    p = np.asarray(zero_shot, dtype=np.float64) ** 3
    p /= p.sum(axis=1, keepdims=True)
    n, k = p.shape
    if k < 2:
        return p
    rows = np.flatnonzero(rng.random(n) < 0.3)
    top = p[rows].argmax(axis=1)
    wrong = (gold[rows] + rng.integers(1, k, size=rows.size)) % k
    a, b = p[rows, top].copy(), p[rows, wrong].copy()
    p[rows, top], p[rows, wrong] = b, a
    return p


def _unit(m: np.ndarray) -> np.ndarray:
    out: np.ndarray = m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
    return out


def weak_features(enc: Encoded, rng: np.random.Generator, rank: int = 4, noise: float = 1.0) -> Inputs:
    """Features too weak to reach the targets: embeddings (and label embeddings) through a random
    rank-`rank` projection plus isotropic noise, and the zero-shot flattened (p^0.25, renormalized,
    mixed half and half with uniform)."""
    d = enc.emb.shape[1]
    proj = rng.normal(size=(d, rank)) @ rng.normal(size=(rank, d)) / np.sqrt(d)

    def project(m: np.ndarray, sigma: float) -> np.ndarray:
        z = _unit(np.asarray(m, dtype=np.float64) @ proj)
        return _unit(z + sigma * rng.normal(size=z.shape) / np.sqrt(d)).astype(np.float32)

    k = enc.zero_shot.shape[1]
    flat = np.asarray(enc.zero_shot, dtype=np.float64) ** 0.25
    flat /= flat.sum(axis=1, keepdims=True)
    return Inputs(project(enc.emb, noise), project(enc.label_emb, 0.0), 0.5 * flat + 0.5 / k)


def condition_inputs(enc: Encoded, gold: np.ndarray, condition: str, rng: np.random.Generator) -> Inputs:
    if condition == "overconfident":
        return Inputs(enc.emb, enc.label_emb, overconfident(enc.zero_shot, gold, rng))
    if condition == "weak-features":
        return weak_features(enc, rng)
    return Inputs(enc.emb, enc.label_emb, enc.zero_shot)


@dataclass(frozen=True)
class ValidityTask:
    dataset: str
    condition: str
    target: float
    seed: int


@dataclass(frozen=True)
class ValiditySettings:
    pool_size: int
    annotator_error: float
    human_error: float
    delta: float
    refit_every: int
    refit_growth: float
    arrival_ratio: float
    second_opinions: int
    blind: bool = False


# Filled before the workers fork (they inherit it): dataset name -> (pool, encoding).
_DATA: dict[str, tuple[Pool, Encoded]] = {}


def _seed_of(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "big")


def run_validity_task(task: ValidityTask, settings: ValiditySettings) -> tuple[ValidityTask, SimResult]:
    pool, enc = _DATA[task.dataset]
    n = len(pool.gold)
    # Each seed: its own subsample (shared by the conditions and targets of that seed), its own
    # condition draws, annotator noise and audit draws.
    pick = np.arange(n)
    if 0 < settings.pool_size < n:
        sub = np.random.default_rng(_seed_of("pool", task.dataset, task.seed))
        pick = np.sort(sub.choice(n, settings.pool_size, replace=False))
    gold = pool.gold[pick]
    part = Encoded(enc.emb[pick], enc.label_emb, enc.zero_shot[pick])
    rng = np.random.default_rng(_seed_of("condition", task.dataset, task.condition, task.seed))
    inputs = condition_inputs(part, gold, task.condition, rng)
    spec = project_spec(
        pool.name,
        pool.labels,
        task.target,
        "dataset",
        settings.human_error,
        settings.delta,
        blind=settings.blind,
    )
    params = SimParams(
        seed=_seed_of("run", task.dataset, task.condition, task.target, task.seed),
        annotator_error=settings.annotator_error,
        refit_every=settings.refit_every,
        refit_growth=settings.refit_growth,
        arrival_ratio=settings.arrival_ratio if task.condition == "stream" else 0.0,
        second_opinions=settings.second_opinions,
        follow_model=task.condition == "follow-model",
    )
    X = features(inputs.emb, inputs.zero_shot)
    return task, simulate(X, inputs.label_emb, gold, spec, LRPolicyConfig(), params)


def _init_worker() -> None:
    threadpool_limits(1)


def _run_star(args: tuple[ValidityTask, ValiditySettings]) -> tuple[ValidityTask, SimResult]:
    return run_validity_task(*args)


def run_validity(
    tasks: list[ValidityTask], settings: ValiditySettings, workers: int, deadline: float
) -> Iterator[tuple[ValidityTask, SimResult]]:
    """Results as they finish, until every task ran or the deadline passed."""
    if workers <= 1:
        for task in tasks:
            if time.monotonic() >= deadline:
                return
            yield run_validity_task(task, settings)
        return
    ctx = multiprocessing.get_context("fork")
    pool = ctx.Pool(workers, initializer=_init_worker)
    try:
        results = pool.imap_unordered(_run_star, [(t, settings) for t in tasks])
        for _ in tasks:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                # No deadline (inf) means wait as long as it takes: the pool's wait cannot take inf.
                yield results.next(timeout=left if math.isfinite(left) else None)
            except multiprocessing.TimeoutError:
                return
    finally:
        pool.terminate()
        pool.join()


def _mean(xs: Sequence[float]) -> float:
    vals = [x for x in xs if not np.isnan(x)]
    return float(np.mean(vals)) if vals else float("nan")


def validity_table(
    results: list[tuple[ValidityTask, SimResult]],
    datasets: Sequence[str],
    targets: Sequence[float],
    delta: float,
) -> str:
    head = (
        f"{'dataset':<10} {'condition':<14} {'target':>6} {'runs':>5} {'valid':>6} {'certif':>6} "
        f"{'falsecert':>9} {'human':>6} {'final':>7} {'min':>7} {'auto':>6} {'autoacc':>7} {'rejbat':>6} "
        f"{'sec':>5}"
    )
    lines = [head, "-" * len(head)]
    for name in datasets:
        for cond in CONDITIONS:
            for target in targets:
                rs = [
                    r for t, r in results if t.dataset == name and t.condition == cond and t.target == target
                ]
                if not rs:
                    continue
                acc = np.array([r.final_accuracy for r in rs])
                cert = np.array([r.certified for r in rs])
                valid = float((acc >= target - 1e-12).mean())
                false_cert = float((cert & (acc < target - 1e-12)).mean())
                lines.append(
                    f"{name:<10} {cond:<14} {target:>6.2f} {len(rs):>5d} {valid:>6.3f} {cert.mean():>6.3f} "
                    f"{false_cert:>9.3f} {_mean([r.human_share for r in rs]):>6.3f} {acc.mean():>7.4f} "
                    f"{acc.min():>7.4f} {_mean([r.auto for r in rs]):>6.0f} "
                    f"{_mean([r.auto_accuracy for r in rs]):>7.4f} "
                    f"{_mean([r.rejected_batches for r in rs]):>6.1f} {_mean([r.seconds for r in rs]):>5.1f}"
                )
    lines.append(
        "valid = share of runs with final dataset accuracy (vs gold) >= target; certif = share certified "
        "(lower bound >= target at the end);\nfalsecert = share of runs certified but below target (the "
        f"certificate's error rate, at most delta = {delta} if it is valid); human = mean human share; "
        "final/min = mean/worst final accuracy;\nauto = mean items accepted automatically, autoacc their "
        "mean accuracy; rejbat = mean batches handed back to people; sec = mean seconds per run."
    )
    return "\n".join(lines)


def validity_main(args: argparse.Namespace, datasets: list[str]) -> int:
    t0 = time.monotonic()
    deadline = t0 + 60.0 * args.max_minutes if args.max_minutes else float("inf")
    for name in datasets:
        pool = builtin_pool(name)
        _DATA[name] = (pool, encode(pool, encoder=args.encoder))
    targets = tuple(args.target) if args.target else VALIDITY_TARGETS
    conditions = tuple(args.conditions) if args.conditions else CONDITIONS
    settings = ValiditySettings(
        pool_size=args.pool_size,
        annotator_error=args.annotator_error,
        human_error=args.annotator_error if args.human_error is None else args.human_error,
        delta=args.delta,
        refit_every=args.refit_every,
        refit_growth=0.2 if args.refit_growth is None else args.refit_growth,
        arrival_ratio=3.0 if args.arrival_ratio is None else args.arrival_ratio,
        second_opinions=args.second_opinions,
        blind=args.blind,
    )
    print(f"settings: {settings}", flush=True)
    # Seeds outermost, so a run stopped early has every configuration at about the same count.
    tasks = [
        ValidityTask(name, cond, target, seed)
        for seed in range(args.seeds)
        for name in datasets
        for cond in conditions
        for target in targets
    ]
    results: list[tuple[ValidityTask, SimResult]] = []
    for task, r in run_validity(tasks, settings, args.workers, deadline):
        results.append((task, r))
        if args.verbose:
            print(
                f"  {task.dataset} {task.condition} {task.target} seed={task.seed}: acc={r.final_accuracy:.4f} "
                f"lb={r.lower_bound:.4f} human={r.human_share:.3f} auto={r.auto} {r.seconds:.1f}s",
                flush=True,
            )
    wall = time.monotonic() - t0
    print(validity_table(results, datasets, targets, args.delta))
    if len(results) < len(tasks):
        print(
            f"STOPPED EARLY (--max-minutes {args.max_minutes}): {len(results)} of {len(tasks)} runs finished; "
            "the table covers the finished runs only."
        )
    per = {name: [r.seconds for t, r in results if t.dataset == name] for name in datasets}
    print(
        "seconds per run: "
        + ", ".join(f"{name} {np.mean(s):.1f}" for name, s in per.items() if s)
        + f"; wall {wall / 60:.1f} min, {args.workers} worker(s)"
    )
    return 0


# -- one run per dataset and target ---------------------------------------------------------------


def report_run(name: str, target: float, guarantee: str, seed: int, r: SimResult) -> str:
    return (
        f"{name:<10} {target:>6.2f} {guarantee:<9} {seed:>4d} {r.items:>6d} {r.human_share:>6.3f} "
        f"{r.auto:>6d} {_pct(r.auto_accuracy):>7} {r.model_labeled:>6d} {r.final_accuracy:>7.4f} "
        f"{r.lower_bound:>7.4f} {'yes' if r.certified else 'no':>5} {r.audits:>6d}/{r.audit_disagreements:<4d} "
        f"{r.batches:>4d}/{r.rejected_batches:<3d} {r.adjudicated + r.second_opinions:>5d} {r.refits:>5d} "
        f"{r.seconds:>7.1f}"
    )


def _pct(x: float) -> str:
    return "n/a" if np.isnan(x) else f"{x:.4f}"


RUN_HEAD = (
    f"{'dataset':<10} {'target':>6} {'guarantee':<9} {'seed':>4} {'items':>6} {'human':>6} {'auto':>6} "
    f"{'autoacc':>7} {'model':>6} {'final':>7} {'lower':>7} {'cert':>5} {'audits/dis':>11} "
    f"{'bat/rej':>8} {'2nd':>5} {'refit':>5} {'sec':>7}"
)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=BUILTIN, action="append")
    ap.add_argument("--jsonl", type=Path, help="any JSONL pool with text and label fields")
    ap.add_argument("--descriptions", type=Path, help="YAML label -> description (with --jsonl)")
    ap.add_argument(
        "--target", type=float, nargs="+", help="target accuracies (default 0.95; validity 0.95 0.98)"
    )
    ap.add_argument("--guarantee", choices=["dataset", "automatic"], nargs="+", default=["dataset"])
    ap.add_argument("--annotator-error", type=float, default=0.02, help="simulated annotators' error rate")
    ap.add_argument(
        "--human-error",
        type=float,
        help="error rate the certificate assumes of people (default: the annotator error)",
    )
    ap.add_argument("--delta", type=float, default=0.05)
    ap.add_argument("--audit-rate", type=float, default=0.0, help="audit floor (0: sized to the pool)")
    ap.add_argument("--budget-items", type=int, default=0)
    ap.add_argument("--budget-share", type=float, default=0.0)
    ap.add_argument("--repeat", type=int, default=1, help="seeds first..first+repeat-1")
    ap.add_argument("--first-seed", type=int, default=0, help="the first seed (see --repeat)")
    ap.add_argument("--refit-every", type=int, default=10)
    ap.add_argument(
        "--refit-growth", type=float, help="batch grows to this share of the labels (validity: 0.2)"
    )
    ap.add_argument("--arrival-ratio", type=float, help="stream: items per human label (validity stream: 3)")
    ap.add_argument("--pool-size", type=int, help="random subsample of the pool (validity default 1500)")
    ap.add_argument("--second-opinions", type=int, default=0, help="label_issues second opinions per refit")
    ap.add_argument(
        "--blind",
        action="store_true",
        help="people label blind (the project hides suggestions): every label that disagrees with the "
        "model goes to a second person and people's errors are bounded from the checks",
    )
    ap.add_argument(
        "--set", nargs="*", default=[], help="LRPolicyConfig overrides, e.g. l2=0.1 folds=5 l2_grid=0.01,0.1"
    )
    ap.add_argument(
        "--encoder", choices=list(ENCODERS), default=MINILM.name, help="the CPU labeler's sentence model"
    )
    ap.add_argument("--validity", action="store_true", help="many seeds, five conditions (see above)")
    ap.add_argument("--seeds", type=int, default=20, help="validity: seeds per configuration")
    ap.add_argument("--conditions", nargs="+", choices=CONDITIONS, help="validity: a subset of conditions")
    ap.add_argument("--workers", type=int, default=1, help="validity: processes")
    ap.add_argument("--max-minutes", type=float, default=0.0, help="validity: stop and report after this")
    ap.add_argument("--verbose", action="store_true", help="validity: one line per finished run")
    args = ap.parse_args(argv)
    print(
        "$ " + shlex.join(["python", "-m", "loadtests.al_offline", *(sys.argv[1:] if argv is None else argv)])
    )
    print(f"started {time.strftime('%Y-%m-%d %H:%M:%S')}; {code_version()}", flush=True)
    # One BLAS thread: the fits are small, and these machines are shared.
    threadpool_limits(1)

    if args.validity:
        if args.pool_size is None:
            args.pool_size = 1500
        return validity_main(args, list(args.dataset or BUILTIN))

    overrides: dict[str, object] = {}
    for kv in args.set:
        key, val = kv.split("=", 1)
        cur = getattr(LRPolicyConfig(), key)
        if isinstance(cur, bool):
            overrides[key] = val.lower() in ("1", "true", "yes")
        elif isinstance(cur, tuple):  # a grid: comma-separated numbers, empty for none
            overrides[key] = tuple(float(v) for v in val.split(",") if v)
        else:
            overrides[key] = type(cur)(val)
    cfg = replace(LRPolicyConfig(), **overrides)  # type: ignore[arg-type]
    pools: list[Pool] = []
    if args.jsonl:
        desc = read_descriptions(args.descriptions) if args.descriptions else {}
        pools.append(make_pool(args.jsonl.stem, _read_jsonl(args.jsonl), desc))
    pools += [builtin_pool(d) for d in args.dataset or []]
    if not pools:
        ap.error("give --dataset and/or --jsonl (or --validity)")
    human_error = args.annotator_error if args.human_error is None else args.human_error
    print(
        f"annotator error {args.annotator_error}, assumed human error {human_error}, delta {args.delta}, "
        f"refit every {args.refit_every} growing {args.refit_growth or 0}, arrival ratio "
        f"{args.arrival_ratio or 0}, second opinions {args.second_opinions}, budget "
        f"{args.budget_items} items / {args.budget_share} share"
    )
    print(RUN_HEAD, flush=True)
    for pool in pools:
        enc = encode(pool, encoder=args.encoder)
        gold, emb, zs = pool.gold, enc.emb, enc.zero_shot
        if args.pool_size and args.pool_size < len(gold):
            pick = np.sort(np.random.default_rng(0).choice(len(gold), args.pool_size, replace=False))
            gold, emb, zs = gold[pick], emb[pick], zs[pick]
        X = features(emb, zs)
        print(
            f"# {pool.name}: {len(gold)} items, labeler-only accuracy {(zs.argmax(axis=1) == gold).mean():.4f}"
        )
        for target in args.target or [0.95]:
            for guarantee in args.guarantee:
                spec = project_spec(
                    pool.name,
                    pool.labels,
                    target,
                    guarantee,
                    human_error,
                    args.delta,
                    args.audit_rate,
                    args.budget_items,
                    args.budget_share,
                    blind=args.blind,
                )
                for seed in range(args.first_seed, args.first_seed + args.repeat):
                    params = SimParams(
                        seed=seed,
                        annotator_error=args.annotator_error,
                        refit_every=args.refit_every,
                        refit_growth=args.refit_growth or 0.0,
                        arrival_ratio=args.arrival_ratio or 0.0,
                        second_opinions=args.second_opinions,
                    )
                    r = simulate(X, enc.label_emb, gold, spec, cfg, params)
                    print(report_run(pool.name, target, guarantee, seed, r), flush=True)
    print(
        "human = share labeled by people (audits included); auto = accepted automatically (autoacc vs gold); "
        "model = finalized by the model when the budget ran out;\nfinal = final dataset accuracy vs gold; "
        "lower = certified lower bound at the end; cert = lower >= target; audits/dis = audit labels / "
        "disagreements that stood; bat/rej = proposal batches / handed back; 2nd = second opinions (labels "
        "beyond one per item, not in human)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
