"""Results of a benchmark run: Markdown tables, PNG plots and a JSON summary in one folder."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fints.benchmark.labels import (
    COMPARED,
    COMPARED_METRICS,
    METRICS,
    REFERENCE_ICL_K,
    ROUGE,
    Judge,
    Label,
    Metric,
    target_metrics,
)
from fints.benchmark.latency import MethodLatency
from fints.benchmark.plots import plot_task
from fints.benchmark.preregistered import PreRegistered, preregistered, preregistered_markdown
from fints.benchmark.runner import Row, compare
from fints.benchmark.stats import UserDifference

Pair = tuple[str, str, dict[str, UserDifference]]  # (row, minus row, difference per metric)
Comparison = tuple[str, str, dict[str, UserDifference]]  # (row, its role, best minus row)

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


def _differences(a: Row, b: Row, seed: int) -> dict[str, UserDifference]:
    """``a`` minus ``b`` on every metric both rows have, paired over the same queries."""
    measured = COMPARED_METRICS if a.has_nll and b.has_nll else METRICS
    return {m: compare(a, b, m, seed) for m in measured}


def _difference_cells(diffs: dict[str, UserDifference]) -> str:
    return " | ".join(str(diffs[m]) if m in diffs else "n/a" for m in COMPARED_METRICS)


def _difference_header(judge: str) -> str:
    return f"ΔROUGE-1 | ΔROUGE-L | Δ{judge} | ΔNLL |\n|---|---|---|---|---|---|"


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
    _preregistered: dict[int, list[PreRegistered]] = field(
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

    def preregistered(self, seed: int = 0) -> list[PreRegistered]:
        """The pre-registered comparisons that ran, Holm-corrected (kept per seed)."""
        if seed not in self._preregistered:

            def difference(label: str, other: str, metric: str) -> UserDifference | None:
                a, b = self.row(label), self.row(other)
                assert a is not None and b is not None
                return _differences(a, b, seed).get(metric)

            labels = [r.label for r in self.rows]
            self._preregistered[seed] = preregistered(labels, difference)
        return self._preregistered[seed]

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


#: How every difference is summarized (stats.user_bootstrap).
INTERVALS = "mean over users [95% user-bootstrap CI] p=sign-flip over users MDE=80% power"


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
        f"| method | role | NLL | ROUGE-1 | ROUGE-L | {report.judge_name} | ΔNLL vs none [95% CI] "
        "| ΔR-1 vs none [95% CI] | ΔR-L vs none [95% CI] | words | length gap | casing gap "
        "| s/query | tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report.rows:
        s = row.summary()
        against = _differences(row, none, 0) if none is not None and row is not none else {}
        dn, d1, dl = (against[m].interval() if m in against else "" for m in (Metric.NLL, *ROUGE))
        r1, rl, judge = (s[m] for m in METRICS)
        lines.append(
            f"| {row.label} | {row.role} | {_fmt(s.get(Metric.NLL, math.nan))} | {_fmt(r1)} | "
            f"{_fmt(rl)} | {_fmt(judge, 3)} | {dn} | {d1} | {dl} | {_fmt(row.style.words, 1)} | "
            f"{_fmt(row.style.length_gap, 2)} | {_fmt(row.style.casing_gap, 2)} | "
            f"{_fmt(row.seconds_per_query, 2)} | {_fmt(row.tokens_per_second, 1)} |"
        )
    comps = report.comparisons()
    if comps:
        lines += [
            "",
            f"Best Fints minus each baseline / control ({INTERVALS}; "
            f"{report.test_queries} queries, {report.users} users):",
            "",
            f"| against | role | {_difference_header(report.judge_name)}",
        ]
        for label, role, diffs in comps:
            lines.append(f"| {label} | {role} | {_difference_cells(diffs)} |")
        lines += ["", f"Verdict: {report.verdict()}"]
    lines += preregistered_markdown(report.preregistered())
    for question, answers in report.probes():
        lines += [
            "",
            f"{question} ({INTERVALS})",
            "",
            f"| row | minus | {_difference_header(report.judge_name)}",
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


def _per_query(row: Row) -> dict[str, list[float]]:
    """Per-query scores (test order), so later comparisons need no generation cache."""
    rounded: dict[str, list[float]] = {
        m: [round(float(x), 4) for x in row.scores.get(m)] for m in ROUGE
    }
    out = {**rounded, Metric.JUDGE: [float(x) for x in row.judge_hits]}
    if row.has_nll:
        out[Metric.NLL] = [round(float(x), 5) for x in row.nll]
    return out


def _query_users(report: TaskReport) -> list[str]:
    """The user of each test query (test order), for intervals that resample users."""
    return next((r.users for r in report.rows if r.users), [])


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
        "NLL (the primary metric) is the per-token negative log-likelihood of each query's "
        "gold output plus end of turn (nats/token), teacher-forced after the row's own prompt "
        "with its own steering vectors. ROUGE-1 / ROUGE-L are F-measures (rouge-score, Porter "
        "stemmer on). Differences are paired per query and summarized over users: the mean "
        "of the users' mean differences, its 95% interval from 2000 bootstrap resamples of "
        "the users, a two-sided sign-flip p-value over users and the minimum detectable "
        "effect MDE = (z_0.975 + z_0.8) x SE, SE = std of the users' mean differences / "
        "sqrt(users) (5% two-sided, 80% power). "
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
                "preregistered": [p.to_dict() for p in r.preregistered()],
                "probes": {
                    question: [
                        {"row": label, "minus": other, **{m: str(d) for m, d in diffs.items()}}
                        for label, other, diffs in answers
                    ]
                    for question, answers in r.probes()
                },
                "per_query": {row.label: _per_query(row) for row in r.rows},
                "users": _query_users(r),
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
