"""Running methods on a task: cached generations, scoring, validation-based selection.

Finished generations are appended to a JSON Lines file per (model fingerprint and
dtype, task key, method key, generation options), one line per query, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fints.benchmark.methods import DEFAULT_TAU, BenchContext, Method, MethodSpec, make_method
from fints.benchmark.metrics import (
    Difference,
    RougeScores,
    StyleStats,
    TextClassifier,
    paired_bootstrap,
    rouge,
    style_stats,
)
from fints.benchmark.tasks import Query, Task
from fints.errors import InvalidInputError
from fints.generation import GenerationOptions
from fints.sites import parse_sites


@dataclass(frozen=True)
class Output:
    qid: str
    text: str
    seconds: float  # this row's share of its batch's wall time
    tokens: int  # generated tokens


class Runner:
    """Runs methods on queries of one context, caching every finished generation."""

    def __init__(
        self,
        ctx: BenchContext,
        options: GenerationOptions,
        cache_root: Path,
        *,
        batch_size: int = 16,
        progress: bool = True,
    ) -> None:
        if batch_size < 1:
            raise InvalidInputError(f"batch size must be >= 1, got {batch_size}")
        self.ctx, self.options, self.batch_size, self.progress = ctx, options, batch_size, progress
        self.cache_root = cache_root
        self.generated = 0  # rows generated (not from cache) by this runner

    def cache_file(self, method: Method) -> Path:
        opts = hashlib.sha256(json.dumps(asdict(self.options), sort_keys=True).encode())
        model = self.ctx.model
        weights = f"{model.fingerprint[:16]}-{str(model.dtype).removeprefix('torch.')}"
        folder = self.cache_root / "generations" / weights / self.ctx.task.key()
        return folder / f"{method.key()}-{opts.hexdigest()[:8]}.jsonl"

    def _read_cache(self, path: Path) -> dict[str, Output]:
        done: dict[str, Output] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    done[row["qid"]] = Output(**row)
                except (json.JSONDecodeError, TypeError, KeyError):
                    continue  # a line cut short by an interruption
        return done

    def run(self, method: Method, queries: Sequence[Query]) -> list[Output]:
        path = self.cache_file(method)
        done = self._read_cache(path)
        todo = [q for q in queries if q.qid not in done]
        if todo:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Similar lengths in one batch: less padding.
            todo.sort(key=lambda q: len(q.input))
            bar = tqdm(
                total=len(todo),
                desc=f"{self.ctx.task.name}: {method.label}",
                unit="q",
                disable=not self.progress,
                leave=False,
            )
            with path.open("a", encoding="utf-8") as handle:
                for start in range(0, len(todo), self.batch_size):
                    batch = todo[start : start + self.batch_size]
                    began = time.perf_counter()
                    completions = method.generate(batch, self.ctx, self.options)
                    share = (time.perf_counter() - began) / len(batch)
                    for query, completion in zip(batch, completions, strict=True):
                        out = Output(query.qid, completion.text, share, len(completion.token_ids))
                        done[query.qid] = out
                        handle.write(json.dumps(asdict(out), ensure_ascii=False) + "\n")
                    handle.flush()
                    self.generated += len(batch)
                    bar.update(len(batch))
            bar.close()
        return [done[q.qid] for q in queries]


# -- scoring -------------------------------------------------------------------------------


@dataclass
class Row:
    """One method's scores on one split."""

    label: str
    role: str
    description: str
    key: str
    scores: RougeScores
    judge_hits: np.ndarray  # per query: the judge names the query's user
    style: StyleStats
    seconds_per_query: float
    tokens_per_second: float
    texts: list[str] = field(repr=False, default_factory=list)

    def summary(self) -> dict[str, float]:
        means = self.scores.mean()
        return {
            "rouge1": means["rouge1"],
            "rougeL": means["rougeL"],
            "judge": float(self.judge_hits.mean()),
        }


def build_judge(task: Task, seed: int = 0) -> TextClassifier:
    """Persona: the mood judge on held-out pairs; otherwise attribution on history outputs."""
    if "classifier_data" in task.extra:
        data = task.extra["classifier_data"]
        return TextClassifier(seed).fit([t for t, _ in data], [m for _, m in data])
    texts = [i.output for u in task.users.values() for i in u.history]
    labels = [u.user for u in task.users.values() for _ in u.history]
    return TextClassifier(seed).fit(texts, labels)


def score(
    method: Method,
    outputs: Sequence[Output],
    queries: Sequence[Query],
    task: Task,
    judge: TextClassifier,
) -> Row:
    texts = [o.text for o in outputs]
    users = [q.user for q in queries]
    seconds = sum(o.seconds for o in outputs)
    tokens = sum(o.tokens for o in outputs)
    history = {name: [i.output for i in s.history] for name, s in task.users.items()}
    return Row(
        label=method.label,
        role=method.role,
        description=method.describe(),
        key=method.key(),
        scores=rouge(texts, [q.reference for q in queries]),
        judge_hits=judge.hit_rate(texts, users),
        style=style_stats(texts, users, history),
        seconds_per_query=seconds / max(len(outputs), 1),
        tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
        texts=texts,
    )


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


def compare(a: Row, b: Row, metric: str, seed: int = 0) -> Difference:
    if metric == "judge":
        return paired_bootstrap(a.judge_hits, b.judge_hits, seed=seed)
    return paired_bootstrap(a.scores.get(metric), b.scores.get(metric), seed=seed)


# -- validation selection --------------------------------------------------------------------


@dataclass(frozen=True)
class SearchSpace:
    """The Fints settings searched on validation, one stage at a time."""

    layers: tuple[int, ...]
    strengths: tuple[float, ...] = (0.05, 0.15, 0.4)  # relative to the site's norm
    absolute_strengths: tuple[float, ...] = (2.0, 8.0)
    components: tuple[str, ...] = ("attn+mlp", "attn", "mlp", "block")
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
    log: list[tuple[str, str, float, dict[str, float]]]  # (stage, description, objective, means)
    kept: list[str] = field(default_factory=list)  # where the margin kept the current setting


def default_fints(space: SearchSpace, default_top_k: int = 5) -> MethodSpec:
    """Where the search starts: the middle layer and strength, attn+mlp."""
    return MethodSpec(
        "fints",
        kind="fints",
        sites=f"{space.layers[len(space.layers) // 2]}.attn+mlp",
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
    queries = task.queries("validation")
    if not queries:
        raise InvalidInputError("the task has no validation queries (n_val = 0)")
    persona = "classifier_data" in task.extra
    log: list[tuple[str, str, float, dict[str, float]]] = []
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


def methods_for_test(
    best: MethodSpec, absolute: MethodSpec | None, contrasts: Sequence[str], *, unique: bool = True
) -> list[MethodSpec]:
    """Baselines, the chosen Fints, its design variants and the controls.

    A variant can coincide with the chosen setting (``fints attn`` when ``attn`` was
    chosen); with ``unique`` only the first spec of each configuration is kept.
    """
    layer = parse_sites(best.sites)[0].layer
    icl = max(best.icl_k, 3)
    specs = [
        MethodSpec("none", role="baseline"),
        MethodSpec("icl k=1", kind="icl", icl_k=1, role="baseline"),
        MethodSpec("icl k=3", kind="icl", icl_k=3, role="baseline"),
        best.with_(label="fints (best on val)", role="fints"),
    ]
    for uv in ("mean", "pca", "logistic"):
        specs.append(
            best.with_(label=f"user vector ({uv})", kind="vector", user_vector=uv, role="baseline")
        )
    for comp in ("attn", "mlp", "attn+mlp", "block"):
        specs.append(best.with_(label=f"fints {comp}", sites=f"{layer}.{comp}", role="variant"))
    flip = "mean" if best.aggregation == "attentive" else "attentive"
    specs.append(best.with_(label=f"fints {flip} aggregation", aggregation=flip, role="variant"))
    if best.icl_k:
        specs.append(best.with_(label="fints without icl", icl_k=0, role="variant"))
    else:
        specs.append(best.with_(label="fints + icl k=3", icl_k=3, role="variant"))
    for c in contrasts:
        specs.append(best.with_(label=f"fints {c} contrast", contrast=c, role="variant"))
    if best.relative and absolute is not None:
        specs.append(absolute.with_(label="fints absolute strength", role="variant"))
    elif not best.relative:
        specs.append(
            best.with_(
                label="fints relative strength", relative=True, strength=0.15, role="variant"
            )
        )
    if not best.centered:
        # Without the direction every user shares: is the user's own dictionary still
        # better than another user's (report.PROBES)?
        centered = best.with_(label="fints centered", centered=True, role="variant")
        specs += [
            centered,
            centered.with_(label="fints centered (wrong-user dictionary)", vector_source="wrong"),
        ]
    specs += [
        best.with_(label="control: random direction", vector_source="random", role="control"),
        best.with_(label="control: wrong-user dictionary", vector_source="wrong", role="control"),
    ]
    specs += [
        MethodSpec(
            f"control: icl k={k} wrong user",
            kind="icl",
            icl_k=k,
            icl_source="wrong",
            role="control",
        )
        for k in sorted({1, icl})
    ]
    if best.icl_k:
        specs.append(
            best.with_(label="control: fints on wrong-user icl", icl_source="wrong", role="control")
        )
    return deduplicated(specs) if unique else specs


def deduplicated(specs: Sequence[MethodSpec]) -> list[MethodSpec]:
    """The first spec of each configuration, in order."""
    first: dict[str, MethodSpec] = {}
    for spec in specs:
        first.setdefault(spec.key(), spec)
    return list(first.values())


def evaluate(
    runner: Runner, specs: Sequence[MethodSpec], judge: TextClassifier, split: str = "test"
) -> list[Row]:
    queries = runner.ctx.task.queries(split)
    rows = []
    for spec in tqdm(
        specs, desc=f"{runner.ctx.task.name} methods", unit="method", disable=not runner.progress
    ):
        method = make_method(spec)
        rows.append(score(method, runner.run(method, queries), queries, runner.ctx.task, judge))
    return rows
