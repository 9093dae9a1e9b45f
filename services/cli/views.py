"""Rich renderings of project stats and workforce figures for `tandem status`, `tandem quality`
and the demo."""

from __future__ import annotations

import math

from rich.table import Table

from services.gen.tandem.projects.v1 import projects_pb2
from services.gen.tandem.stats.v1 import stats_pb2
from services.gen.tandem.workforce.v1 import workforce_pb2


def pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def certificate_line(sc: stats_pb2.ScorerStats) -> str:
    """What is certified, in one line a labeling manager can read."""
    if not sc.guarantee:
        return "-"
    scope = "dataset" if sc.guarantee == "dataset" else "automatic labels"
    verdict = "[green]target met[/]" if sc.certified else "[yellow]target not certified yet[/]"
    people = (
        f"people assumed to err at {sc.human_error_assumed:.1%}"
        if sc.human_error_assumed > 0
        else "human labels taken as right"
    )
    if sc.human_error_assumed > 0 and sc.human_labels_checked:
        people += (
            f", their labels checked against the model's ({sc.second_opinions:,} second opinions):"
            f" at most {sc.human_errors_upper:.0f} wrong"
        )
    return (
        f"{scope} accuracy ≥ {sc.certified_accuracy:.4f} with probability {1 - sc.certificate_delta:.0%} "
        f"(target {sc.target_accuracy:.2f}: {verdict}); estimated {sc.estimated_accuracy:.4f}; "
        f"human share {sc.human_share:.1%}; {sc.audited} audits; {people}"
    )


def stats_table(s: stats_pb2.ProjectStats, elapsed: float | None = None) -> Table:
    table = Table(title=f"project {s.project_id}", show_header=True, header_style="bold")
    table.add_column("stage")
    table.add_column("figures")
    items = s.ingest.items
    table.add_row(
        "ingest", f"{items:,} items, {s.ingest.duplicates:,} duplicates, {s.ingest.rejected:,} rejected"
    )
    sc = s.scorer
    table.add_row(
        "labeler + scorer",
        f"{sc.predicted:,} pre-labeled ({pct(sc.predicted, items)}); auto-accepted {sc.auto_accepted:,}, "
        f"waiting for people {sc.in_review:,}, labeled by people {sc.human_labeled:,}, "
        f"withdrawn after refit {sc.withdrawn:,}",
    )
    if sc.human_budget or sc.below_target or sc.control:
        budget = f"{sc.human_budget:,} items" if sc.human_budget else "unlimited"
        table.add_row(
            "budget",
            f"human budget {budget}; finalized below target {sc.below_target:,}; random control arm {sc.control:,}",
        )
    table.add_row(
        "model",
        f"{sc.model_version or '-'}; {sc.refits} refits; {sc.proposed_pending:,} proposed items waiting for their audits",
    )
    table.add_row("certificate", certificate_line(sc))
    if sc.audited:
        table.add_row(
            "audits",
            f"{sc.audited} audited items, {sc.audit_disagreements} disagreements after a second opinion; "
            f"first-label agreement {sc.audit_accuracy:.3f} "
            f"(95% interval {sc.audit_accuracy_low:.3f}–{sc.audit_accuracy_high:.3f})",
        )
    if sc.flagged_slices:
        table.add_row(
            "flagged slices",
            f"audited more (a quality report flagged them): {', '.join(sc.flagged_slices)}",
        )
    rv = s.review
    table.add_row(
        "review",
        f"open {rv.open:,}, leased {rv.leased:,}, done {rv.done:,}, withdrawn {rv.withdrawn:,}; "
        f"{rv.annotators} annotators, {rv.mean_seconds_per_label:.2f} s per label",
    )
    ex = s.export
    by_source = ", ".join(f"{k} {v:,}" for k, v in sorted(ex.by_source.items())) or "-"
    line = f"{ex.finalized:,} of {ex.items:,} final ({pct(ex.finalized, ex.items)}): {by_source}"
    if elapsed:
        line += f"; {ex.finalized / elapsed:.1f} items/s"
    table.add_row("final labels", line)
    human = ex.by_source.get("human", 0)
    table.add_row("human share", pct(human, ex.finalized))
    return table


# --- workforce ------------------------------------------------------------------------------------


def rate(r: workforce_pb2.Rate) -> str:
    """A share with its 95% interval and what it rests on: "0.93 [0.85, 0.97] n=40"."""
    return f"{r.value:.2f} [{r.low:.2f}, {r.high:.2f}] n={r.n}" if r.n else "-"


def age(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def method_name(method: str) -> str:
    return {"dawid_skene": "Dawid-Skene", "majority_vote": "majority vote"}.get(method, method or "-")


def workforce_table(project: projects_pb2.Project, q: workforce_pb2.Quality) -> Table:
    """A few lines for `tandem status`; `tandem quality` has the whole picture."""
    table = Table(title="workforce", show_header=False)
    table.add_column("what")
    table.add_column("figures")
    overlap = f"{max(project.overlap, 1)} per item"
    if project.max_overlap > max(project.overlap, 1):
        overlap += f", up to {project.max_overlap} while they disagree"
    alpha = "-" if math.isnan(q.krippendorff_alpha) else f"{q.krippendorff_alpha:.3f}"
    table.add_row(
        "people",
        f"{overlap}; {method_name(q.method)} on {q.consensus_items:,} items; Krippendorff's α {alpha}; "
        f"{q.gold_items:,} gold questions",
    )
    paused = [f"{a.annotator_id} ({a.paused_reason or 'paused'})" for a in q.annotators if a.paused]
    if paused:
        table.add_row("paused", "; ".join(paused))
    if q.pools:
        table.add_row(
            "pools",
            "; ".join(
                f"{p.pool_id or '(no pool)'}: {p.open:,} open, {p.leased:,} leased"
                + (f", oldest {age(p.oldest_open_seconds)}" if p.open else "")
                for p in q.pools
            ),
        )
    return table
