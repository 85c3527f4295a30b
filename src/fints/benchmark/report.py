"""Results of a benchmark run: Markdown tables, PNG plots and a JSON summary in one folder."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fints.benchmark.labels import (
    COMPARED,
    METRICS,
    REFERENCE_ICL_K,
    ROUGE,
    Judge,
    Label,
    Metric,
    Role,
    target_metrics,
)
from fints.benchmark.latency import MethodLatency
from fints.benchmark.metrics import Difference
from fints.benchmark.runner import Row, compare

Pair = tuple[str, str, dict[str, Difference]]  # (row, minus row, difference per metric)
Comparison = tuple[str, str, dict[str, Difference]]  # (row, its role, best minus row)

# Paired questions, each answered by (row, minus row) differences where both rows ran.
PROBES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    # A model that cannot use the user's context gives steering nothing to capture.
    (
        "Does the model use the user's context?",
        tuple(
            pair
            for k in (1, REFERENCE_ICL_K)
            for pair in ((Label.icl(k), Label.NONE), (Label.icl(k), Label.wrong_user_icl(k)))
        ),
    ),
    # Users' vectors share one direction; what is left once it is removed?
    (
        "Without the direction all users share, does the user's own dictionary do better?",
        (
            (Label.CENTERED, Label.CENTERED_WRONG_USER),
            (Label.CENTERED, Label.BEST),
            (Label.CENTERED, Label.NONE),
        ),
    ),
)


def _differences(a: Row, b: Row, seed: int) -> dict[str, Difference]:
    """``a`` minus ``b`` on every metric, paired over the same queries."""
    return {m: compare(a, b, m, seed) for m in METRICS}


def _difference_cells(diffs: dict[str, Difference]) -> str:
    return " | ".join(str(diffs[m]) for m in METRICS)


@dataclass
class TaskReport:
    name: str
    judge_name: str  # a Judge
    source: str
    sha256: str
    users: int
    test_queries: int
    validation_queries: int
    max_new_tokens: int
    rows: list[Row]
    best_label: str = Label.BEST
    chosen: str = ""
    selection_log: list[tuple[str, str, float, dict[str, float]]] = field(default_factory=list)
    selection_kept: list[str] = field(default_factory=list)  # winners the margin turned down
    sparsity: list[dict[str, Any]] = field(default_factory=list)
    clusters: list[dict[str, Any]] = field(default_factory=list)
    latency: list[MethodLatency] = field(default_factory=list)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _comparisons: dict[int, list[Comparison]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def row(self, label: str) -> Row | None:
        return next((r for r in self.rows if r.label == label), None)

    def comparisons(self, seed: int = 0) -> list[Comparison]:
        """The best Fints row against none, every baseline and every control.

        Bootstrapping is the slow part, so each seed's answer is kept (rows do not change
        once the report is built).
        """
        if seed not in self._comparisons:
            best = self.row(self.best_label)
            self._comparisons[seed] = [
                (other.label, other.role, _differences(best, other, seed))
                for other in self.rows
                if best is not None and other is not best and other.role in COMPARED
            ]
        return self._comparisons[seed]

    def probes(self, seed: int = 0) -> list[tuple[str, list[Pair]]]:
        """Each question of :data:`PROBES` with the differences of its pairs that ran."""
        out = []
        for question, pairs in PROBES:
            answers = []
            for label, other_label in pairs:
                row, other = self.row(label), self.row(other_label)
                if row is not None and other is not None:
                    answers.append((label, other_label, _differences(row, other, seed)))
            if answers:
                out.append((question, answers))
        return out

    def verdict(self) -> str:
        comps = self.comparisons()
        if not comps:
            return "no Fints row"
        lost = [
            f"{label} ({m})" for label, _, diffs in comps for m in ROUGE if not diffs[m].above_zero
        ]
        if Metric.JUDGE in target_metrics(self.judge_name):
            lost += [
                f"{label} ({self.judge_name})"
                for label, _, d in comps
                if not d[Metric.JUDGE].above_zero
            ]
        if not lost:
            return "PASS: Fints beats none, every baseline and every control with CI above zero"
        return f"FAIL: CI not above zero against {len(lost)} comparison(s): " + ", ".join(lost)


#: Bar colours of the methods plot; other roles (baselines) are blue.
ROLE_COLORS: dict[str, str] = {
    Role.FINTS: "tab:red",
    Role.CONTROL: "tab:gray",
    Role.VARIANT: "tab:orange",
}


def _fmt(x: float, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def task_markdown(report: TaskReport) -> str:
    lines = [f"### {report.name}", ""]
    lines.append(
        f"Data: `{report.source}` (sha256 `{report.sha256[:16]}...`), {report.users} users, "
        f"{report.test_queries} test and {report.validation_queries} validation queries, "
        f"max_new_tokens={report.max_new_tokens}. Judge: {report.judge_name}."
    )
    if report.chosen:
        lines += ["", f"Chosen on validation: **{report.chosen}**"]
    none = report.row(Label.NONE)
    lines += [
        "",
        f"| method | role | ROUGE-1 | ROUGE-L | {report.judge_name} | ΔR-1 vs none [95% CI] | "
        "ΔR-L vs none [95% CI] | words | length gap | casing gap | s/query | tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report.rows:
        s = row.summary()
        d1, dl = (
            str(compare(row, none, m)) if none is not None and row is not none else ""
            for m in ROUGE
        )
        r1, rl, judge = (s[m] for m in METRICS)
        lines.append(
            f"| {row.label} | {row.role} | {_fmt(r1)} | {_fmt(rl)} | "
            f"{_fmt(judge, 3)} | {d1} | {dl} | {_fmt(row.style.words, 1)} | "
            f"{_fmt(row.style.length_gap, 2)} | {_fmt(row.style.casing_gap, 2)} | "
            f"{_fmt(row.seconds_per_query, 2)} | {_fmt(row.tokens_per_second, 1)} |"
        )
    comps = report.comparisons()
    if comps:
        lines += [
            "",
            f"Best Fints minus each baseline / control (paired bootstrap, 95% CI, "
            f"{report.test_queries} queries):",
            "",
            f"| against | role | ΔROUGE-1 | ΔROUGE-L | Δ{report.judge_name} |",
            "|---|---|---|---|---|",
        ]
        for label, role, diffs in comps:
            lines.append(f"| {label} | {role} | {_difference_cells(diffs)} |")
        lines += ["", f"Verdict: {report.verdict()}"]
    for question, answers in report.probes():
        lines += [
            "",
            f"{question} (paired bootstrap, 95% CI)",
            "",
            f"| row | minus | ΔROUGE-1 | ΔROUGE-L | Δ{report.judge_name} |",
            "|---|---|---|---|---|",
        ]
        for label, other, diffs in answers:
            lines.append(f"| {label} | {other} | {_difference_cells(diffs)} |")
    if report.selection_log:
        lines += [
            "",
            "Validation search (objective = mean of ROUGE-1 and ROUGE-L"
            + (f" + {Judge.MOOD_RATE}" if report.judge_name == Judge.MOOD_RATE else "")
            + "):",
            "",
            "| stage | setting | objective | ROUGE-1 | ROUGE-L | judge |",
            "|---|---|---|---|---|---|",
        ]
        for stage, desc, obj, means in report.selection_log:
            r1, rl, judge = (means[m] for m in METRICS)
            lines.append(f"| {stage} | {desc} | {obj:.4f} | {r1:.4f} | {rl:.4f} | {judge:.3f} |")
        if report.selection_kept:
            lines += ["", "Stage winners that did not clear the search margin:", ""]
            lines += [f"- {note}" for note in report.selection_kept]
    if report.sparsity:
        lines += ["", "Data sparsity (share of each user's history kept):", ""]
        lines += ["| history | method | ROUGE-1 | ROUGE-L | judge | ΔR-L vs none [95% CI] |"]
        lines += ["|---|---|---|---|---|---|"]
        for item in report.sparsity:
            r1, rl, judge = (item[m] for m in METRICS)
            lines.append(
                f"| {item['history']} | {item['label']} | {r1:.4f} | {rl:.4f} | {judge:.3f} | "
                f"{item['delta_rougeL']} |"
            )
    if report.clusters:
        lines += ["", "Heterogeneous users (KMeans on mean history embeddings):", ""]
        lines += ["| cluster | users | queries | method | ROUGE-1 | ROUGE-L | judge |"]
        lines += ["|---|---|---|---|---|---|---|"]
        for item in report.clusters:
            r1, rl, judge = (item[m] for m in METRICS)
            lines.append(
                f"| {item['cluster']} | {item['users']} | {item['queries']} | {item['label']} | "
                f"{r1:.4f} | {rl:.4f} | {judge:.3f} |"
            )
    if report.latency:
        first = report.latency[0]
        lines += [
            "",
            f"Latency on one batch ({first.queries} test queries, {first.new_tokens} new tokens "
            "each, end of turn ignored; methods interleaved, medians; comparable across rows):",
            "",
            f"| method | s/query (wall) | CPU s/query | tok/s | CPU vs {first.label} |",
            "|---|---|---|---|---|",
        ]
        for t in report.latency:
            lines.append(
                f"| {t.label} | {t.wall_per_query:.3f} | {t.cpu_per_query:.3f} | "
                f"{t.tokens_per_second:.1f} | {t.cpu_vs_first:.3f}x |"
            )
    if report.diagnostics:
        lines += ["", "Diagnostics:", "", "```", json.dumps(report.diagnostics, indent=1), "```"]
    if report.seconds:
        timing = ", ".join(f"{k} {v:.0f} s" for k, v in report.seconds.items())
        lines += ["", f"Wall time: {timing}."]
    for note in report.notes:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def plot_task(report: TaskReport, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    rows = report.rows
    fig, axes = plt.subplots(1, 3, figsize=(15, max(3.0, 0.35 * len(rows) + 1)))
    for ax, metric in zip(axes, METRICS, strict=True):
        values, lows, highs = [], [], []
        for row in rows:
            data = row.judge_hits if metric == Metric.JUDGE else row.scores.get(metric)
            values.append(float(np.mean(data)))
            rng = np.random.default_rng(0)
            boots = data[rng.integers(0, len(data), (1000, len(data)))].mean(axis=1)
            low, high = np.percentile(boots, [2.5, 97.5])
            lows.append(values[-1] - low)
            highs.append(high - values[-1])
        colors = [ROLE_COLORS.get(r.role, "tab:blue") for r in rows]
        y = np.arange(len(rows))
        ax.barh(y, values, xerr=[lows, highs], color=colors, capsize=2)
        first = metric == METRICS[0]  # the row labels once, on the left
        ax.set_yticks(y, [r.label for r in rows] if first else [""] * len(rows))
        ax.invert_yaxis()
        ax.set_title(report.judge_name if metric == Metric.JUDGE else metric)
    fig.suptitle(f"{report.name}: test queries (95% bootstrap CI)")
    fig.tight_layout()
    path = folder / f"{report.name}_methods.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
    if report.sparsity:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label in sorted({s["label"] for s in report.sparsity}):
            pts = [s for s in report.sparsity if s["label"] == label]
            ax.plot([p["x"] for p in pts], [p[Metric.ROUGEL] for p in pts], marker="o", label=label)
        ax.set_xlabel("history kept (share or items)")
        ax.set_ylabel("ROUGE-L")
        ax.set_xscale("log")
        ax.legend(fontsize=7)
        ax.set_title(f"{report.name}: data sparsity")
        fig.tight_layout()
        path = folder / f"{report.name}_sparsity.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _per_query(row: Row) -> dict[str, list[float]]:
    """Per-query scores (test order), so later comparisons need no generation cache."""
    rounded: dict[str, list[float]] = {
        m: [round(float(x), 4) for x in row.scores.get(m)] for m in ROUGE
    }
    return {**rounded, Metric.JUDGE: [float(x) for x in row.judge_hits]}


def write_report(
    folder: Path,
    reports: list[TaskReport],
    header: dict[str, Any],
) -> Path:
    """Write ``results.md``, ``results.json`` and plots; return the Markdown path."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["# fints benchmark", ""]
    for key, value in header.items():
        lines.append(f"- {key}: `{value}`" if key == "command" else f"- {key}: {value}")
    lines.append("")
    lines.append(
        "ROUGE-1 / ROUGE-L are F-measures (rouge-score, Porter stemmer on); intervals are "
        "95% paired-bootstrap intervals (2000 resamples) of the mean per-query difference. "
        "Latency is wall time per query at the run's batch size; tokens/s is generated tokens "
        "per second of wall time."
    )
    lines.append("")
    for report in reports:
        lines.append(task_markdown(report))
        for path in plot_task(report, folder):
            lines.append(f"![{path.stem}]({path.name})")
            lines.append("")
    md = folder / "results.md"
    md.write_text("\n".join(lines))
    summary = {
        "header": header,
        "tasks": [
            {
                "name": r.name,
                "verdict": r.verdict(),
                "chosen": r.chosen,
                "test_queries": r.test_queries,
                "rows": {
                    row.label: {**row.summary(), "role": row.role, "method": row.description}
                    for row in r.rows
                },
                "best_minus": {
                    label: {m: str(d) for m, d in diffs.items()}
                    for label, _, diffs in r.comparisons()
                },
                "probes": {
                    question: [
                        {"row": label, "minus": other, **{m: str(d) for m, d in diffs.items()}}
                        for label, other, diffs in answers
                    ]
                    for question, answers in r.probes()
                },
                "per_query": {row.label: _per_query(row) for row in r.rows},
                "selection_log": r.selection_log,
                "selection_kept": r.selection_kept,
                "sparsity": r.sparsity,
                "clusters": r.clusters,
                "latency": [asdict(t) for t in r.latency],
                "seconds": r.seconds,
                "diagnostics": r.diagnostics,
            }
            for r in reports
        ],
    }
    (folder / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    return md
