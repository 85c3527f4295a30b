"""Running methods on a task: cached generations and scoring.

Finished generations are appended to a JSON Lines file per (model fingerprint and
dtype, task key, method key, generation options), one line per query, so an
interrupted run resumes where it stopped.
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
        return {**self.scores.mean(), Metric.JUDGE: float(self.judge_hits.mean())}


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
    )


def compare(a: Row, b: Row, metric: str, seed: int = 0) -> Difference:
    if metric == Metric.JUDGE:
        return paired_bootstrap(a.judge_hits, b.judge_hits, seed=seed)
    return paired_bootstrap(a.scores.get(metric), b.scores.get(metric), seed=seed)


def deduplicated(specs: Sequence[MethodSpec]) -> list[MethodSpec]:
    """The first spec of each configuration, in order."""
    first: dict[str, MethodSpec] = {}
    for spec in specs:
        first.setdefault(spec.key(), spec)
    return list(first.values())


def evaluate(
    runner: Runner, specs: Sequence[MethodSpec], judge: TextClassifier, split: str = Split.TEST
) -> list[Row]:
    queries = runner.ctx.task.queries(split)
    rows = []
    for spec in tqdm(
        specs, desc=f"{runner.ctx.task.name} methods", unit="method", disable=not runner.progress
    ):
        method = make_method(spec)
        rows.append(score(method, runner.run(method, queries), queries, runner.ctx.task, judge))
    return rows
