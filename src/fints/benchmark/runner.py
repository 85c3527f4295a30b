"""Running methods on a task: cached generations, cached target NLLs and scoring.

Finished generations are appended to a JSON Lines file per (model fingerprint and
dtype, task key, method key, generation options), one line per query, so an
interrupted run resumes where it stopped. Each query's per-token NLL of its gold
output (teacher-forced on the prompt and steering the row generates with) is cached
the same way, per (model, task, method, :data:`NLL_TARGET`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fints.benchmark.banks import BenchContext
from fints.benchmark.labels import Metric, Split
from fints.benchmark.methods import Method, MethodSpec, make_method
from fints.benchmark.metrics import RougeScores, StyleStats, TextClassifier, rouge, style_stats
from fints.benchmark.stats import UserDifference, user_bootstrap
from fints.benchmark.tasks import Query, Task
from fints.errors import InvalidInputError
from fints.generation import GenerationOptions

#: What the cached NLLs score (part of their file name): a new definition must not
#: reuse old values.
NLL_TARGET = "reference+eos"


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
        self.scored = 0  # target NLLs computed (not from cache) by this runner

    def _folder(self, kind: str) -> Path:
        model = self.ctx.model
        weights = f"{model.fingerprint[:16]}-{str(model.dtype).removeprefix('torch.')}"
        return self.cache_root / kind / weights / self.ctx.task.key()

    def cache_file(self, method: Method) -> Path:
        opts = hashlib.sha256(json.dumps(asdict(self.options), sort_keys=True).encode())
        return self._folder("generations") / f"{method.key()}-{opts.hexdigest()[:8]}.jsonl"

    def nll_cache_file(self, method: Method) -> Path:
        """The NLLs do not depend on the generation options."""
        target = hashlib.sha256(NLL_TARGET.encode()).hexdigest()[:8]
        return self._folder("nll") / f"{method.key()}-{target}.jsonl"

    def nll(self, method: Method, queries: Sequence[Query]) -> np.ndarray:
        """Each query's per-token NLL of its gold output under ``method`` (cached)."""
        path = self.nll_cache_file(method)
        done: dict[str, float] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    done[str(row["qid"])] = float(row["nll"])
                except (json.JSONDecodeError, TypeError, KeyError, ValueError):
                    continue  # a line cut short by an interruption
        todo = [q for q in queries if q.qid not in done]
        if todo:
            path.parent.mkdir(parents=True, exist_ok=True)
            todo.sort(key=lambda q: len(q.input) + len(q.reference))
            bar = tqdm(
                total=len(todo),
                desc=f"{self.ctx.task.name}: {method.label} (NLL)",
                unit="q",
                disable=not self.progress,
                leave=False,
            )
            with path.open("a", encoding="utf-8") as handle:
                for start in range(0, len(todo), self.batch_size):
                    batch = todo[start : start + self.batch_size]
                    values = method.nll(batch, self.ctx, self.batch_size)
                    for query, value in zip(batch, values, strict=True):
                        done[query.qid] = value
                        handle.write(json.dumps({"qid": query.qid, "nll": value}) + "\n")
                    handle.flush()
                    self.scored += len(batch)
                    bar.update(len(batch))
            bar.close()
        return np.asarray([done[q.qid] for q in queries], dtype=float)

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
    users: list[str] = field(repr=False, default_factory=list)  # per query (empty: unknown)
    nll: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))  # per query

    @property
    def has_nll(self) -> bool:
        return self.nll.size > 0

    def values(self, metric: str) -> np.ndarray:
        """Per-query values of ``metric`` (a :class:`Metric`)."""
        if metric == Metric.JUDGE:
            return self.judge_hits
        if metric == Metric.NLL:
            if not self.has_nll:
                raise InvalidInputError(f"row {self.label!r} has no target NLL")
            return self.nll
        return self.scores.get(metric)

    def summary(self) -> dict[str, float]:
        means = {**self.scores.mean(), Metric.JUDGE: float(self.judge_hits.mean())}
        return {**means, Metric.NLL: float(self.nll.mean())} if self.has_nll else means


def build_judge(task: Task, seed: int = 0) -> TextClassifier:
    """Persona: the mood judge on held-out pairs; otherwise attribution on history outputs."""
    data = task.judge_data
    if data is not None:
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
        users=users,
    )


def compare(a: Row, b: Row, metric: str, seed: int = 0) -> UserDifference:
    """``a - b`` on ``metric``, paired per query, resampling users
    (:func:`~fints.benchmark.stats.user_bootstrap`)."""
    if a.users and b.users and a.users != b.users:
        raise InvalidInputError(f"rows {a.label!r} and {b.label!r} are not over the same queries")
    users = a.users or b.users or None
    return user_bootstrap(a.values(metric), b.values(metric), users, seed=seed)


def deduplicated(specs: Sequence[MethodSpec]) -> list[MethodSpec]:
    """The first spec of each configuration, in order."""
    first: dict[str, MethodSpec] = {}
    for spec in specs:
        first.setdefault(spec.key(), spec)
    return list(first.values())


def evaluate(
    runner: Runner,
    specs: Sequence[MethodSpec],
    judge: TextClassifier,
    split: str = Split.TEST,
    *,
    nll: bool = True,
) -> list[Row]:
    """Every spec's row on ``split``: its generations scored and (with ``nll``) the
    per-token NLL of each query's gold output."""
    queries = runner.ctx.task.queries(split)
    rows = []
    for spec in tqdm(
        specs, desc=f"{runner.ctx.task.name} methods", unit="method", disable=not runner.progress
    ):
        method = make_method(spec)
        row = score(method, runner.run(method, queries), queries, runner.ctx.task, judge)
        if nll:
            row.nll = runner.nll(method, queries)
        rows.append(row)
    return rows
