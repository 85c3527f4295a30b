"""Statistics and the report of ``trained_probe.py``: every row against the own vector,
on the NLL (lower is better) and, with ``--generate``, ROUGE and the judge (higher)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

import numpy as np

from fints.benchmark.stats import holm, user_bootstrap

PRE_REGISTERED = ("wrong-user delta", "shared", "icl k=3 (own)")


def cluster_stats(diff: np.ndarray, seed: int, lower_is_better: bool = True) -> dict[str, float]:
    """``diff [users, queries]``: the product's user-resampling comparison
    (:func:`fints.benchmark.stats.user_bootstrap`: mean, 95% interval, sign-flip p, MDE)
    and the users on whom the first row is better."""
    users = [str(u) for u in range(diff.shape[0]) for _ in range(diff.shape[1])]
    d = user_bootstrap(diff.ravel(), np.zeros(diff.size), users, resamples=10000, seed=seed)
    return {
        "mean": d.mean,
        "mde": d.mde,
        "lo": d.lo,
        "hi": d.hi,
        "p": d.p,
        "users_better": int(((diff.mean(axis=1) < 0) == lower_is_better).sum()),
    }


def report(
    scores: dict[str, np.ndarray], args: argparse.Namespace, extra: dict[str, Any]
) -> dict[str, Any]:
    own = scores["own"]
    comparisons = {
        other: cluster_stats(own - scores[other], seed=i)
        for i, other in enumerate(k for k in scores if k != "own")
    }
    adjusted = holm({k: comparisons[k]["p"] for k in PRE_REGISTERED if k in comparisons})
    for k, p in adjusted.items():
        comparisons[k]["p_holm"] = p
    return {
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "args": {k: str(v) for k, v in vars(args).items()},
        "users": int(own.shape[0]),
        "queries": int(own.size),
        "mean_nll": {k: float(v.mean()) for k, v in scores.items()},
        "own_minus": comparisons,
        **extra,
    }


def comparison_line(name: str, c: dict[str, Any], better: int, users: int) -> str:
    """One table row of a paired comparison: difference, interval, MDE, users better, p's."""
    holm_p = f"{c['p_holm']:.4f}" if "p_holm" in c else "-"
    return (
        f"| {name} | {c['mean']:+.4f} | [{c['lo']:+.4f}, {c['hi']:+.4f}] | {c['mde']:.4f} | "
        f"{better}/{users} | {c['p']:.4f} | {holm_p} |"
    )


def markdown(result: dict[str, Any]) -> str:
    args = result["args"]
    model = args.get("model", "None")
    lines = [
        "# Trained steering vectors: shared + per-user delta "
        f"({args['task']}, {'SmolLM2' if model == 'None' else model})",
        "",
        f"Command: `{result['command']}`",
        "",
        f"{result['users']} authors, {result['queries']} test queries; settings: "
        f"{json.dumps(result['settings'])}",
        "",
        "| row | mean NLL (nats/token) |",
        "|---|---|",
        *[f"| {k} | {v:.4f} |" for k, v in result["mean_nll"].items()],
        "",
        "Own minus each row (negative = own is better); 95% bootstrap interval resampling "
        "users; p: sign-flip test over users; Holm over the three pre-registered rows.",
        "",
        "| own minus | diff | 95% CI | MDE | users own better | p | p (Holm) |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, c in result["own_minus"].items():
        lines.append(comparison_line(k, c, c["users_better"], result["users"]))
    if result.get("pairs"):
        lines += ["", "| comparison | diff | 95% CI | MDE | users first better | p | - |"]
        lines += ["|---|---|---|---|---|---|---|"]
        for k, c in result["pairs"].items():
            lines.append(comparison_line(k, c, c["users_better"], result["users"]))
    if "generation" in result:
        lines += generation_markdown(result)
    lines += ["", "Training:", "", *[f"- {line}" for line in result["training"]], ""]
    return "\n".join(lines)


def generation_report(scores: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """Per metric: every row's mean and own minus each other row (higher is better)."""
    out: dict[str, Any] = {}
    for metric, by_row in scores.items():
        own = by_row["own"]
        out[metric] = {
            "mean": {k: float(v.mean()) for k, v in by_row.items()},
            "own_minus": {
                k: cluster_stats(own - v, seed=i, lower_is_better=False)
                for i, (k, v) in enumerate(by_row.items())
                if k != "own"
            },
        }
    return out


def generation_markdown(result: dict[str, Any]) -> list[str]:
    generation = result["generation"]
    rows = list(next(iter(generation.values()))["mean"])
    lines = [
        "",
        "Generation (greedy): ROUGE against the gold output, and the judge (TF-IDF author "
        "attribution fitted on the evaluated authors' history outputs: 1 when it names the "
        "query's author). Own minus each row, positive = own is better; intervals over users.",
        "",
        "| row | " + " | ".join(generation) + " |",
        "|---|" + "---|" * len(generation),
        *[
            f"| {r} | " + " | ".join(f"{generation[m]['mean'][r]:.4f}" for m in generation) + " |"
            for r in rows
        ],
        "",
        "| own minus | " + " | ".join(f"{m} diff [95% CI] (MDE, p)" for m in generation) + " |",
        "|---|" + "---|" * len(generation),
    ]
    for r in rows:
        if r == "own":
            continue
        cells = []
        for m in generation:
            c = generation[m]["own_minus"][r]
            cells.append(
                f"{c['mean']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}] ({c['mde']:.4f}, {c['p']:.3f})"
            )
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return lines
