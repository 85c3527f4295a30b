"""The validation search: which Fints setting a run takes to its test queries.

Coordinate-wise: each stage varies one setting of the best so far, scored on
validation queries only (see :func:`select_fints`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fints.benchmark.labels import COMPONENTS, DEFAULT_COMPONENT, Kind, Label, Split
from fints.benchmark.methods import DEFAULT_TAU, MethodSpec, make_method
from fints.benchmark.metrics import TextClassifier
from fints.benchmark.runner import Row, Runner, deduplicated, score
from fints.errors import InvalidInputError
from fints.sites import parse_sites

#: One evaluated setting: (stage, description, objective, mean of each metric).
LogEntry = tuple[str, str, float, dict[str, float]]


def per_query_objective(row: Row, persona: bool) -> np.ndarray:
    """What validation selection maximizes, per query (the search compares the means).

    The mean of ROUGE-1 and ROUGE-L, plus the judge's hit for persona (the mood rate).
    """
    value = (row.scores.rouge1 + row.scores.rougeL) / 2
    return value + row.judge_hits if persona else value


def standard_errors(gain: np.ndarray, tolerance: float = 1e-12) -> float:
    """The mean of a paired per-query gain in standard errors of that mean.

    Where every query gains the same (up to ``tolerance``) the answer is 0 for no
    gain and +-inf for a certain one.
    """
    mean = float(gain.mean())
    se = float(gain.std(ddof=1) / np.sqrt(len(gain))) if len(gain) > 1 else 0.0
    if se > tolerance:
        return mean / se
    return 0.0 if abs(mean) <= tolerance else float(np.copysign(np.inf, mean))


@dataclass(frozen=True)
class SearchSpace:
    """The Fints settings searched on validation, one stage at a time."""

    layers: tuple[int, ...]
    strengths: tuple[float, ...] = (0.05, 0.15, 0.4)  # relative to the site's norm
    absolute_strengths: tuple[float, ...] = (2.0, 8.0)
    components: tuple[str, ...] = COMPONENTS
    top_k: tuple[int, ...] = (5,)  # ALL_ENTRIES: the whole dictionary
    aggregations: tuple[str, ...] = ("attentive", "mean")
    taus: tuple[float, ...] = (DEFAULT_TAU,)  # tried only where they matter (attentive, K > 1)
    icl_k: tuple[int, ...] = (0, 3)
    contrasts: tuple[str, ...] = ("context",)
    rounds: int = 1  # passes over the stages; a later pass can revisit an early choice
    # How many standard errors of the paired per-query validation gain a stage's winner
    # needs to replace the current setting (0: any gain, ties to the earlier candidate).
    margin: float = 0.0

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise InvalidInputError(f"the search needs at least 1 round, got {self.rounds}")
        if not self.margin >= 0:
            raise InvalidInputError(f"the search margin must be >= 0, got {self.margin}")


@dataclass
class Selection:
    best: MethodSpec
    best_absolute: MethodSpec | None
    log: list[LogEntry]
    kept: list[str] = field(default_factory=list)  # where the margin kept the current setting


def default_fints(space: SearchSpace, default_top_k: int = 5) -> MethodSpec:
    """Where the search starts: the middle layer and strength, attn+mlp."""
    return MethodSpec(
        Label.SEARCH_START,
        kind=Kind.FINTS,
        sites=f"{space.layers[len(space.layers) // 2]}.{DEFAULT_COMPONENT}",
        strength=space.strengths[len(space.strengths) // 2],
        top_k=space.top_k[0] if space.top_k else default_top_k,
        tau=space.taus[0] if space.taus else DEFAULT_TAU,
    )


def select_fints(
    runner: Runner,
    space: SearchSpace,
    judge: TextClassifier,
    *,
    default_top_k: int = 5,
) -> Selection:
    """Coordinate-wise search on validation queries; test queries are never touched.

    Each stage varies one setting of the best so far (the current value competes
    too, so a stage never makes the objective worse). The first pass fixes the
    site before ICL and the contrast are chosen; with ``space.rounds > 1`` the
    stages run again, under the later choices, until a pass changes nothing.
    With ``space.margin > 0`` a stage's winner replaces the current setting only
    if its paired per-query gain on validation is more than ``margin`` standard
    errors above zero, so later passes stop chasing noise.
    """
    task = runner.ctx.task
    queries = task.queries(Split.VALIDATION)
    if not queries:
        raise InvalidInputError("the task has no validation queries (n_val = 0)")
    persona = task.judge_data is not None  # the mood rate is part of the objective
    log: list[LogEntry] = []
    kept: list[str] = []
    per_query: dict[str, np.ndarray] = {}  # each evaluated setting's per-query objective

    def value(stage: str, spec: MethodSpec) -> float:
        key = spec.key()
        if key not in per_query:
            method = make_method(spec)
            row = score(method, runner.run(method, queries), queries, task, judge)
            per_query[key] = per_query_objective(row, persona)
            log.append((stage, spec.describe(), float(per_query[key].mean()), row.summary()))
        return float(per_query[key].mean())

    def replaces(stage: str, winner: MethodSpec, current: MethodSpec) -> bool:
        """Whether ``winner`` (already evaluated) takes over from ``current``."""
        if winner.key() == current.key():
            return False
        if space.margin == 0:
            return True
        gain = per_query[winner.key()] - per_query[current.key()]
        errors = standard_errors(gain)
        if errors > space.margin:
            return True
        if gain.mean() > 0:
            kept.append(
                f"{stage}: kept {current.describe()} over {winner.describe()} "
                f"({gain.mean():+.4f}, {errors:.1f} standard errors <= {space.margin:g})"
            )
        return False

    def pick(stage: str, current: MethodSpec, candidates: list[MethodSpec]) -> MethodSpec:
        winner = max(deduplicated([*candidates, current]), key=lambda s: value(stage, s))
        return winner if replaces(stage, winner, current) else current

    layer = lambda s: parse_sites(s.sites)[0].layer  # noqa: E731
    component = lambda s: s.sites.split(".", 1)[1]  # noqa: E731
    stages: list[tuple[str, Callable[[MethodSpec], list[MethodSpec]]]] = [
        ("layer", lambda b: [b.with_(sites=f"{L}.{component(b)}") for L in space.layers]),
        ("strength", lambda b: [b.with_(relative=True, strength=x) for x in space.strengths]),
        ("sites", lambda b: [b.with_(sites=f"{layer(b)}.{c}") for c in space.components]),
        ("top_k", lambda b: [b.with_(top_k=k) for k in space.top_k]),
        ("aggregation", lambda b: [b.with_(aggregation=a) for a in space.aggregations]),
        ("tau", lambda b: [b.with_(tau=t) for t in space.taus] if b.weighs_by_score else []),
        ("icl", lambda b: [b.with_(icl_k=k) for k in space.icl_k]),
        ("contrast", lambda b: [b.with_(contrast=c) for c in space.contrasts]),
    ]
    best = default_fints(space, default_top_k)
    absolute = None
    for round_ in range(1, space.rounds + 1):
        start = best
        tag = "" if round_ == 1 else f" ({round_})"
        for stage, candidates in stages:
            best = pick(stage + tag, best, candidates(best))
        if space.absolute_strengths:
            stage = "absolute strength" + tag
            tried = [best.with_(relative=False, strength=x) for x in space.absolute_strengths]
            absolute = max(deduplicated(tried), key=lambda s: value(stage, s))
            if value(stage, absolute) > value(stage, best) and replaces(stage, absolute, best):
                best = absolute
        if best.key() == start.key():
            break
    return Selection(best, absolute, log, kept)
