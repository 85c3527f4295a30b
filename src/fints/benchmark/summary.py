"""One table across recorded runs: how the validated Fints fared against every comparison.

Each run folder's ``results.json`` keeps every row's per-query scores, so the
paired intervals here are recomputed with the run report's own bootstrap
(2000 resamples, seed 0) rather than parsed from its text. Runs recorded before
per-query scores were kept are listed as left out.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fints.benchmark.labels import (
    COMPARED,
    METRICS,
    Label,
    Metric,
    Role,
    judge_name,
    target_metrics,
)
from fints.benchmark.metrics import Difference, paired_bootstrap
from fints.errors import InvalidInputError


@dataclass(frozen=True)
class Comparison:
    """The validated Fints minus one baseline or control, per metric, paired over queries."""

    label: str
    role: str  # one of COMPARED
    diffs: dict[str, Difference]

    def beaten(self, metrics: Sequence[str]) -> bool:
        return all(self.diffs[m].above_zero for m in metrics)


@dataclass(frozen=True)
class RunSummary:
    """One task of one recorded run."""

    run: str
    task: str
    model: str
    queries: int
    chosen: str
    comparisons: tuple[Comparison, ...]

    @property
    def judge_name(self) -> str:
        return judge_name(self.task)

    @property
    def target_metrics(self) -> tuple[str, ...]:
        return target_metrics(self.judge_name)

    @property
    def beaten(self) -> int:
        """How many comparisons Fints beats with every target metric's interval above zero."""
        return sum(c.beaten(self.target_metrics) for c in self.comparisons)

    def versus(self, label: str) -> Comparison | None:
        return next((c for c in self.comparisons if c.label == label), None)

    def hardest(self, role: str, metric: str, exclude: str = Label.NONE) -> Comparison | None:
        """The row of ``role`` that Fints trails most (or leads least) on ``metric``."""
        rows = [c for c in self.comparisons if c.role == role and c.label != exclude]
        return min(rows, key=lambda c: c.diffs[metric].mean, default=None)


def _model_name(header: dict[str, Any]) -> str:
    return str(header.get("model", "?")).split(" (")[0]


def summarize_run(folder: Path, seed: int = 0) -> tuple[list[RunSummary], list[str]]:
    """Every task of the run in ``folder`` that has a validated Fints row and per-query scores.

    Returns the summaries and, for the tasks left out, one line each saying why.
    """
    path = folder / "results.json"
    if not path.is_file():
        raise InvalidInputError(f"{folder}: no results.json (not a benchmark results folder)")
    try:
        data = json.loads(path.read_text())
        header, tasks = data["header"], data["tasks"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"{path}: not a fints benchmark results file ({exc})") from exc
    summaries, skipped = [], []
    for task in tasks:
        where = f"{folder.name} ({task.get('name', '?')})"
        rows, scores = task.get("rows", {}), task.get("per_query")
        if Label.BEST not in rows:
            skipped.append(f"{where}: no validated Fints row")
            continue
        if not scores or Label.BEST not in scores:
            skipped.append(f"{where}: recorded before per-query scores were kept")
            continue
        comparisons = tuple(
            Comparison(
                label,
                row["role"],
                {
                    m: paired_bootstrap(scores[Label.BEST][m], scores[label][m], seed=seed)
                    for m in METRICS
                },
            )
            for label, row in rows.items()
            if row.get("role") in COMPARED and label in scores
        )
        summaries.append(
            RunSummary(
                run=folder.name,
                task=task.get("name", "?"),
                model=_model_name(header),
                queries=len(scores[Label.BEST][Metric.ROUGEL]),
                chosen=task.get("chosen", ""),
                comparisons=comparisons,
            )
        )
    return summaries, skipped


def summarize_runs(paths: Iterable[Path]) -> tuple[list[RunSummary], list[str]]:
    """:func:`summarize_run` over every run folder that ``paths`` names (:func:`run_folders`)."""
    summaries: list[RunSummary] = []
    skipped: list[str] = []
    for folder in run_folders(paths):
        done, left_out = summarize_run(folder)
        summaries += done
        skipped += left_out
    return summaries, skipped


def run_folders(paths: Iterable[Path]) -> list[Path]:
    """Each path is a run folder or a folder of run folders (``benchmarks/results``)."""
    folders: list[Path] = []
    for path in paths:
        if (path / "results.json").is_file():
            folders.append(path)
        elif path.is_dir():
            found = sorted(p.parent for p in path.glob("*/results.json"))
            if not found:
                raise InvalidInputError(f"{path}: no results.json in it or in its subfolders")
            folders.extend(found)
        else:
            raise InvalidInputError(f"{path}: no such folder")
    return folders


def _cell(comparison: Comparison | None, metric: str, note: str = "") -> str:
    if comparison is None:
        return "-"
    return f"{comparison.diffs[metric]} ({comparison.label}{note})"


def summary_markdown(summaries: Sequence[RunSummary], skipped: Sequence[str] = ()) -> str:
    """The cross-run table: the validated Fints against none and its hardest rivals."""
    lines = [
        "| run | task | model | test queries | chosen on validation | ΔR-L vs none "
        "| ΔR-L vs hardest other baseline | ΔR-L vs hardest control "
        "| Δjudge vs hardest control (judge) | beaten |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        none = s.versus(Label.NONE)
        lines.append(
            " | ".join(
                [
                    f"| {s.run}",
                    s.task,
                    s.model,
                    str(s.queries),
                    s.chosen,
                    str(none.diffs[Metric.ROUGEL]) if none else "-",
                    _cell(s.hardest(Role.BASELINE, Metric.ROUGEL), Metric.ROUGEL),
                    _cell(s.hardest(Role.CONTROL, Metric.ROUGEL), Metric.ROUGEL),
                    _cell(s.hardest(Role.CONTROL, Metric.JUDGE), Metric.JUDGE, f"; {s.judge_name}"),
                    f"{s.beaten}/{len(s.comparisons)} |",
                ]
            )
        )
    lines += [
        "",
        "Differences are the validated Fints minus the named row, mean [95% paired-bootstrap "
        "interval]. *Hardest*: the row Fints trails most (or leads least) on that measure. "
        "*Beaten*: comparisons where every target measure's interval is above zero "
        "(ROUGE-1 and ROUGE-L; on persona also the mood rate).",
    ]
    if skipped:
        lines += ["", "Left out: " + "; ".join(skipped) + "."]
    return "\n".join(lines)
