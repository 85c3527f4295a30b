"""One table across recorded runs: how the validated Fints fared against every comparison.

Each run folder's ``results.json`` keeps every row's per-query scores (and, since they
were recorded, each query's user and the per-token NLL of its gold output), so the
paired differences here are recomputed with the run report's own statistics
(:func:`~fints.benchmark.stats.user_bootstrap`: 2000 resamples of the users, seed 0;
sign-flip p over users; minimum detectable effect) rather than parsed from its text.
Runs recorded before users were kept resample queries (each query its own user). Runs
recorded before per-query scores were kept are listed as left out.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from fints.benchmark.labels import (
    COMPARED,
    COMPARED_METRICS,
    PRE_REGISTERED,
    PRIMARY_METRIC,
    Label,
    Metric,
    Role,
    judge_name,
    target_metrics,
)
from fints.benchmark.preregistered import PreRegistered, preregistered
from fints.benchmark.stats import UserDifference, format_p, user_bootstrap
from fints.errors import InvalidInputError


@dataclass(frozen=True)
class Comparison:
    """The validated Fints minus one baseline or control, per metric, paired over queries."""

    label: str
    role: str  # one of COMPARED
    diffs: dict[str, UserDifference]  # per metric both rows recorded

    def beaten(self, metrics: Sequence[str]) -> bool:
        return all(self.diffs[m].above_zero for m in metrics)


@dataclass(frozen=True)
class RunSummary:
    """One task of one recorded run."""

    run: str
    task: str
    model: str
    queries: int
    users: int  # the users the intervals resample (the queries where users were not kept)
    chosen: str
    comparisons: tuple[Comparison, ...]
    preregistered: tuple[PreRegistered, ...] = ()

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
    """Every task of the run in ``folder`` that has a validated Fints row (or, in runs
    without one, a trained vectors row) and per-query scores.

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
        # the row the run evaluates: the validated Fints, else the first pre-registered
        # tested row it has (trained vectors at their defaults)
        tested = next((label for label in PRE_REGISTERED if label in rows), None)
        if tested is None:
            skipped.append(f"{where}: no validated Fints or trained vectors row")
            continue
        if not scores or tested not in scores:
            skipped.append(f"{where}: recorded before per-query scores were kept")
            continue
        queries = len(scores[tested][Metric.ROUGEL])
        users = task.get("users") or None
        if users is not None and len(users) != queries:
            raise InvalidInputError(f"{where}: {len(users)} users for {queries} queries")
        difference = partial(_recorded_difference, scores, users, seed)
        comparisons = tuple(
            Comparison(label, row["role"], _measured(difference, tested, label))
            for label, row in rows.items()
            if row.get("role") in COMPARED and label in scores
        )
        summaries.append(
            RunSummary(
                run=folder.name,
                task=task.get("name", "?"),
                model=_model_name(header),
                queries=queries,
                users=len(set(users)) if users is not None else queries,
                chosen=task.get("chosen", "") if tested == Label.BEST else tested,
                comparisons=comparisons,
                preregistered=tuple(preregistered(list(scores), difference)),
            )
        )
    return summaries, skipped


def _recorded_difference(
    scores: dict[str, dict[str, list[float]]],
    users: list[str] | None,
    seed: int,
    label: str,
    other: str,
    metric: str,
) -> UserDifference | None:
    """``label`` minus ``other`` on ``metric`` from the recorded per-query scores."""
    a, b = scores.get(label, {}), scores.get(other, {})
    if metric not in a or metric not in b:
        return None  # e.g. the NLL of a run recorded before it was measured
    return user_bootstrap(a[metric], b[metric], users, seed=seed)


def _measured(
    difference: Callable[[str, str, str], UserDifference | None], tested: str, label: str
) -> dict[str, UserDifference]:
    """The evaluated row minus ``label`` on every metric both recorded."""
    diffs = {m: difference(tested, label, m) for m in COMPARED_METRICS}
    return {m: d for m, d in diffs.items() if d is not None}


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
    if comparison is None or metric not in comparison.diffs:
        return "-"
    return f"{comparison.diffs[metric]} ({comparison.label}{note})"


def _preregistered_cell(s: RunSummary) -> str:
    """Each pre-registered comparison's primary difference and Holm-adjusted p."""
    cells = [
        f"{p.minus}: {p.diffs[PRIMARY_METRIC].interval()} "
        f"p(Holm)={format_p(p.holm[PRIMARY_METRIC])}"
        for p in s.preregistered
        if PRIMARY_METRIC in p.diffs
    ]
    return "; ".join(cells) or "-"


def summary_markdown(summaries: Sequence[RunSummary], skipped: Sequence[str] = ()) -> str:
    """The cross-run table: the validated Fints against none and its hardest rivals."""
    lines = [
        "| run | task | model | test queries (users) | row (chosen on validation) | ΔNLL vs none "
        "| ΔR-L vs none | ΔR-L vs hardest other baseline | ΔR-L vs hardest control "
        "| Δjudge vs hardest control (judge) | pre-registered ΔNLL | beaten |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        none = s.versus(Label.NONE)
        lines.append(
            " | ".join(
                [
                    f"| {s.run}",
                    s.task,
                    s.model,
                    f"{s.queries} ({s.users})",
                    s.chosen,
                    str(none.diffs[Metric.NLL]) if none and Metric.NLL in none.diffs else "-",
                    str(none.diffs[Metric.ROUGEL]) if none else "-",
                    _cell(s.hardest(Role.BASELINE, Metric.ROUGEL), Metric.ROUGEL),
                    _cell(s.hardest(Role.CONTROL, Metric.ROUGEL), Metric.ROUGEL),
                    _cell(s.hardest(Role.CONTROL, Metric.JUDGE), Metric.JUDGE, f"; {s.judge_name}"),
                    _preregistered_cell(s),
                    f"{s.beaten}/{len(s.comparisons)} |",
                ]
            )
        )
    lines += [
        "",
        "Differences are the validated Fints (in runs without it: the row named, trained "
        "vectors) minus the named row, paired per query and "
        "summarized over users: mean of the users' mean differences [95% interval from "
        "bootstrap resamples of the users], sign-flip p over users, minimum detectable "
        "effect (5% two-sided, 80% power). NLL: per-token NLL of the gold output (nats/token, "
        "lower is better). *Pre-registered*: the primary metric's difference against each "
        "comparison fixed before the runs, with Holm's correction. *Hardest*: the row Fints "
        "trails most (or leads least) on that measure. "
        "*Beaten*: comparisons where every target measure's interval is above zero "
        "(ROUGE-1 and ROUGE-L; on persona also the mood rate).",
    ]
    if skipped:
        lines += ["", "Left out: " + "; ".join(skipped) + "."]
    return "\n".join(lines)
