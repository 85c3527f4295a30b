"""The run report's PNG plots: each row's means per metric, and the data-sparsity curve."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fints.benchmark.labels import METRICS, Metric, Role

if TYPE_CHECKING:
    from fints.benchmark.report import TaskReport

#: Bar colours of the methods plot; other roles (baselines) are blue.
ROLE_COLORS: dict[str, str] = {
    Role.FINTS: "tab:red",
    Role.CONTROL: "tab:gray",
    Role.VARIANT: "tab:orange",
}


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
