"""The pre-registered comparisons (:data:`~fints.benchmark.labels.PRE_REGISTERED`): each
tested row minus its named rows, with Holm's correction over the family, on the primary
metric (the NLL) and, as its own family, on ROUGE-L."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from fints.benchmark.labels import HOLM_METRICS, PRE_REGISTERED, PRIMARY_METRIC, Metric
from fints.benchmark.stats import UserDifference, format_p, holm

#: ``(row, minus row, metric)`` -> the difference, or None where it was not measured.
DifferenceOf = Callable[[str, str, str], UserDifference | None]

_NAMES = {Metric.NLL: "NLL", Metric.ROUGEL: "ROUGE-L"}


@dataclass(frozen=True)
class PreRegistered:
    """One pre-registered comparison: ``row`` minus ``minus``."""

    row: str
    minus: str
    diffs: dict[str, UserDifference]  # per metric of HOLM_METRICS that was measured
    holm: dict[str, float]  # per metric: the Holm-adjusted p over the row's family

    def to_dict(self) -> dict[str, object]:
        return {
            "row": self.row,
            "minus": self.minus,
            **{m: str(d) for m, d in self.diffs.items()},
            **{f"{m} p_holm": p for m, p in self.holm.items()},
        }


def preregistered(labels: Collection[str], difference: DifferenceOf) -> list[PreRegistered]:
    """Every pre-registered comparison whose two rows ran, Holm-corrected per tested row
    and metric over the comparisons that ran."""
    out: list[PreRegistered] = []
    for tested, others in PRE_REGISTERED.items():
        if tested not in labels:
            continue
        ran = [o for o in others if o in labels]
        diffs: dict[str, dict[str, UserDifference]] = {o: {} for o in ran}
        for other in ran:
            for metric in HOLM_METRICS:
                d = difference(tested, other, metric)
                if d is not None:
                    diffs[other][metric] = d
        adjusted: dict[str, dict[str, float]] = {o: {} for o in ran}
        for metric in HOLM_METRICS:
            family = {o: diffs[o][metric].p for o in ran if metric in diffs[o]}
            for other, p in holm(family).items():
                adjusted[other][metric] = p
        out += [PreRegistered(tested, o, diffs[o], adjusted[o]) for o in ran]
    return out


def preregistered_markdown(items: list[PreRegistered]) -> list[str]:
    """The table of the pre-registered comparisons (no lines when none ran)."""
    if not items:
        return []
    head = " | ".join(
        f"Δ{_NAMES[m]} [95% CI] | MDE | p | p(Holm)" for m in HOLM_METRICS
    )  # fmt: skip
    lines = [
        "",
        f"Pre-registered comparisons (primary metric: {_NAMES[PRIMARY_METRIC]}, nats/token, "
        "lower is better; Holm over each row's comparisons that ran, separately per metric; "
        "intervals and p resample users):",
        "",
        f"| row | minus | {head} |",
        "|---|---|" + "---|---|---|---|" * len(HOLM_METRICS),
    ]
    for item in items:
        cells = []
        for metric in HOLM_METRICS:
            d = item.diffs.get(metric)
            if d is None:
                cells.append("n/a | n/a | n/a | n/a")
                continue
            adjusted = format_p(item.holm[metric])
            cells.append(f"{d.interval()} | {d.mde:.4f} | {format_p(d.p)} | {adjusted}")
        lines.append(f"| {item.row} | {item.minus} | {' | '.join(cells)} |")
    return lines
