"""Shared parts of ``lora_headlines.py``: the rows, scoring them (teacher-forced NLL and
greedy generation through the engine), the paired summaries over users and the report.

Each row is an adapter (none, the task adapter, the user's own or another user's) with
or without the user's steering. NLL rows go through ``AdapterHost.routing`` and the
engine's steering plan for the query; generated rows through ``Personalizer.prepare`` /
``decode`` (the product's path): the user's own and another user's adapter are the
``lora`` mode's lookup of the stored adapter (``adapter=True``), the task adapter a
:class:`fints.adapters.mode.LoraAddition` on the same host; steering off is
``SteeringConfig(enabled=False)``.

With ``--through-adapter`` one NLL row more (:data:`THROUGH`): the user's adapter and a
steering vector trained through it (:func:`train_through`), the plug-in trained to stack.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fints.adapters.host import AdapterHost
from fints.adapters.mode import LoraAddition
from fints.adapters.training import training_examples
from fints.benchmark.metrics import TextClassifier, rouge
from fints.benchmark.stats import user_bootstrap
from fints.benchmark.tasks import Task
from fints.engine import GenerationRequest, GenerationResult, Personalizer
from fints.generation import GenerationOptions
from fints.models import LoadedModel
from fints.modes import SteeringAddition
from fints.prompts import build_prompt_ids
from fints.sites import Site
from fints.steering import SteeringConfig
from fints.target_nll import target_nll
from fints.vector_training import TrainingConfig, train_vectors

#: row: (whose adapter: None, "task", "user" or "other"; steered by the user's dictionary)
ROWS: dict[str, tuple[str | None, bool]] = {
    "base": (None, False),
    "steering": (None, True),
    "task LoRA": ("task", False),
    "task LoRA + steering": ("task", True),
    "per-user LoRA": ("user", False),
    "per-user LoRA + steering": ("user", True),
    "other user's LoRA": ("other", False),
}
#: (a, b): the difference a - b reported with its interval (the first three pre-set).
COMPARISONS = (
    ("per-user LoRA", "other user's LoRA"),
    ("per-user LoRA", "task LoRA"),
    ("per-user LoRA + steering", "per-user LoRA"),
    ("task LoRA", "base"),
    ("steering", "base"),
    ("task LoRA + steering", "task LoRA"),
    ("per-user LoRA + steering", "steering"),
)
#: The NLL row of a vector trained through the user's own adapter, and its comparisons.
THROUGH = "per-user LoRA + vector trained through it"
THROUGH_COMPARISONS = ((THROUGH, "per-user LoRA"), (THROUGH, "per-user LoRA + steering"))
#: generation metrics (higher is better) and their labels in the report
GENERATION = {"rouge1": "ROUGE-1", "rougeL": "ROUGE-L", "judge": "judge", "judge_heldout": ""}
OFF = SteeringConfig(enabled=False)


class Scorer:
    """NLL of a user's queries under an adapter (by name in the host) and steering, and
    greedy answers through the engine (also ``lora_sparsity.py``'s scorer)."""

    def __init__(self, model: LoadedModel, engine: Personalizer, host: AdapterHost) -> None:
        self.model, self.engine, self.host = model, engine, host

    def examples(self, queries: Sequence[Any]) -> tuple[list[list[int]], list[list[int]]]:
        tok = self.model.tokenizer
        prompts = [build_prompt_ids(tok, self.engine.template, q.input) for q in queries]
        targets = [
            [*tok(q.reference, add_special_tokens=False)["input_ids"], tok.eos_token_id]
            for q in queries
        ]
        return prompts, targets

    def steering(self, user: str, queries: Sequence[Any]) -> dict[Site, torch.Tensor]:
        """The engine's plan for each query of ``user`` (retrieval over their dictionary)."""
        requests = [GenerationRequest(user, q.input, adapter=False) for q in queries]
        prepared = self.engine.prepare(requests)
        (steer,) = [a for a in prepared.additions if isinstance(a, SteeringAddition)]
        return steer.vectors

    def nll(
        self, queries: Sequence[Any], adapter: str | None, vectors: dict[Site, torch.Tensor] | None
    ) -> list[float]:
        prompts, targets = self.examples(queries)
        if adapter is None:
            return target_nll(self.model, prompts, targets, vectors).tolist()
        with self.host.routing([adapter]):
            return target_nll(self.model, prompts, targets, vectors).tolist()

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        options: GenerationOptions,
        adapter: str | None = None,
    ) -> list[GenerationResult]:
        """The engine's answers; ``adapter``: every row also through this loaded adapter
        (a ``LoraAddition`` on the host; requests then say ``adapter=False``)."""
        prepared = self.engine.prepare(requests)
        if adapter is not None:
            n = len(requests)
            addition = LoraAddition(self.host, (adapter,) * n, (adapter,) * n)
            addition.annotate(prepared.results)  # as prepare does its modes' additions
            prepared.additions.append(addition)
        return self.engine.decode(prepared, options)


class RowScorer:
    """The rows of :data:`ROWS` for the users of ``task``: their NLL and greedy answers."""

    def __init__(self, scorer: Scorer, task: Task, names: dict[str, str], task_adapter: str):
        self.scorer, self.task, self.names, self.task_adapter = scorer, task, names, task_adapter
        #: per user, the vectors of the :data:`THROUGH` row by site, if trained
        self.through: dict[str, dict[Site, torch.Tensor]] = {}

    @property
    def rows(self) -> list[str]:
        return [*ROWS, *([THROUGH] if self.through else [])]

    def adapter(self, row: str, user: str) -> str | None:
        kind = ROWS[row][0]
        if kind is None:
            return None
        if kind == "task":
            return self.task_adapter
        return self.names[user if kind == "user" else self.task.wrong_user(user)]

    def nll(
        self, row: str, user: str, queries: Sequence[Any], plan: dict[Site, torch.Tensor]
    ) -> list[float]:
        """Per query of ``user``; ``plan``: their steering vectors (used if the row steers)."""
        if row == THROUGH:
            n = len(queries)
            through = {s: v.expand(n, -1) for s, v in self.through[user].items()}
            return self.scorer.nll(queries, self.names[user], through)
        return self.scorer.nll(queries, self.adapter(row, user), plan if ROWS[row][1] else None)

    def generate(
        self,
        row: str,
        pairs: Sequence[tuple[str, Any]],
        options: GenerationOptions,
        batch_size: int,
    ) -> list[str]:
        """Greedy answers of ``row`` to ``(user, query)`` pairs, in mixed batches. The
        user's own and another user's adapter: the ``lora`` mode's lookup of the stored
        adapter (``adapter=True``, the other user's request unsteered)."""
        kind, steered = ROWS[row]
        texts: list[str] = []
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            owners = [self.task.wrong_user(u) if kind == "other" else u for u, _ in chunk]
            requests = [
                GenerationRequest(
                    o, q.input, adapter=kind in ("user", "other"), steering=None if steered else OFF
                )
                for o, (_, q) in zip(owners, chunk, strict=True)
            ]
            task = self.task_adapter if kind == "task" else None
            results = self.scorer.generate(requests, options, task)
            for r, o in zip(results, owners, strict=True):  # the rows went where they should
                assert r.steered == steered, (row, r.note)
                expected = o if kind in ("user", "other") else task
                assert r.adapter == expected, (row, r.adapter)
            texts += [r.text for r in results]
        return texts


def train_through(scorer: RowScorer, config: TrainingConfig) -> dict[str, float]:
    """Per user, a vector at the dictionaries' sites trained from zero (``config``: the
    trained method's per-user settings) on the user's history, every forward pass through
    the user's own adapter (``AdapterHost.routing``): it learns what the adapter left out,
    where the dictionaries' vectors were trained on the base model. Sets
    ``scorer.through``; returns each user's training seconds."""
    inner = scorer.scorer
    sites = inner.engine.extraction.sites
    seconds = {}
    for user in sorted(scorer.task.users):
        history = scorer.task.users[user].history
        examples = training_examples(
            inner.model, inner.engine.template, history, config.max_target_tokens
        )
        start = time.perf_counter()
        with inner.host.routing([scorer.names[user]]):
            trained = train_vectors(inner.model, sites, examples, config=config)
        seconds[user] = time.perf_counter() - start
        scorer.through[user] = {s: trained.values[i] for i, s in enumerate(trained.sites)}
    return seconds


def judges(task: Task) -> dict[str, tuple[TextClassifier, list[str]]]:
    """The attribution judge (TF-IDF on the users' history outputs, as
    ``trained_generation.py``) and, for persona, the held-out mood judge (the task's
    classifier pairs, used by no history or query); each with the test queries' labels."""
    users = sorted(task.users)
    history = [(i.output, u) for u in users for i in task.users[u].history]
    truth = [u for u in users for _ in task.users[u].test]
    data = {"judge": history}
    if task.judge_data:
        data["judge_heldout"] = [(t, m) for t, m in task.judge_data if m in task.users]
    return {
        name: (TextClassifier().fit([t for t, _ in pairs], [u for _, u in pairs]), truth)
        for name, pairs in data.items()
    }


def generation_scores(
    texts: dict[str, list[str]], references: list[str], task: Task
) -> dict[str, dict[str, list[float]]]:
    """Per metric and row, the per-query scores of the answers ``texts[row]``."""
    scores: dict[str, dict[str, list[float]]] = {}
    found = judges(task)
    for row, answers in texts.items():
        r = rouge(answers, references)
        scores.setdefault("rouge1", {})[row] = r.rouge1.tolist()
        scores.setdefault("rougeL", {})[row] = r.rougeL.tolist()
        for name, (judge, truth) in found.items():
            scores.setdefault(name, {})[row] = judge.hit_rate(answers, truth).tolist()
    return scores


def summary(users: list[str], rows: dict[str, list[float]], lower_better: bool) -> dict[str, Any]:
    """Each row's mean and the paired differences, 95 % intervals resampling users."""
    zeros = np.zeros(len(users))
    means = {r: user_bootstrap(v, zeros, users) for r, v in rows.items()}
    out: dict[str, Any] = {
        "means": {r: [d.mean, d.lo, d.hi] for r, d in means.items()},
        "comparisons": {},
    }
    for a, b in [c for c in (*COMPARISONS, *THROUGH_COMPARISONS) if c[0] in rows]:
        d = user_bootstrap(rows[a], rows[b], users)
        per_user: dict[str, list[float]] = {}
        for u, x, y in zip(users, rows[a], rows[b], strict=True):
            per_user.setdefault(u, []).append(x - y)
        sign = -1 if lower_better else 1
        better = sum(1 for v in per_user.values() if sign * np.mean(v) > 0)
        out["comparisons"][f"{a} - {b}"] = {
            "mean": d.mean,
            "lo": d.lo,
            "hi": d.hi,
            "p": d.p,
            "mde": d.mde,
            "users_a_better": f"{better}/{len(per_user)}",
        }
    return out


def comparison_table(comparisons: dict[str, Any], unit: str) -> list[str]:
    lines = [
        f"| a - b ({unit}) | diff | 95 % CI | users a better | p | MDE |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in comparisons.items():
        lines.append(
            f"| {name} | {c['mean']:+.3f} | [{c['lo']:+.3f}, {c['hi']:+.3f}] | "
            f"{c['users_a_better']} | {c['p']:.4f} | {c['mde']:.3f} |"
        )
    return lines


def markdown(result: dict[str, Any]) -> str:
    lines = ["| row | NLL (nats/token), test | 95 % CI (users) | validation |", "|---|---|---|---|"]
    test, val = result["test"]["means"], result["validation"]["means"]
    for row in test:
        m, lo, hi = test[row]
        lines.append(f"| {row} | {m:.3f} | [{lo:.3f}, {hi:.3f}] | {val[row][0]:.3f} |")
    lines += ["", *comparison_table(result["test"]["comparisons"], "NLL")]
    generated = result.get("generation")
    if generated:
        metrics = [m for m in GENERATION if m in generated]
        labels = [GENERATION[m] or "held-out judge" for m in metrics]
        lines += [
            "",
            f"Generation, greedy, {result['max_new_tokens']} new tokens "
            "(means over users, 95 % CI):",
            "",
            "| row | " + " | ".join(labels) + " |",
            "|---" * (len(metrics) + 1) + "|",
        ]
        for row in ROWS:
            cells = ["{:.3f} [{:.3f}, {:.3f}]".format(*generated[m]["means"][row]) for m in metrics]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        for m, label in zip(metrics, labels, strict=True):
            lines += ["", *comparison_table(generated[m]["comparisons"], f"{label}, > 0: a better")]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Any, title: str) -> None:
    """Left: each row's mean NLL; right: the paired differences (both with 95% CIs over
    users; the differences' intervals are the ones that compare rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def bars(ax: Any, names: list[str], stats: list[tuple[float, float, float]]) -> None:
        m = np.array([s[0] for s in stats])
        err = np.array([[s[0] - s[1], s[2] - s[0]] for s in stats]).T
        ax.barh(names, m, xerr=err, color="#4c72b0", ecolor="black", capsize=3)
        ax.invert_yaxis()

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4))
    means = result["test"]["means"]
    bars(left, list(means), [tuple(m) for m in means.values()])
    low = min(m[1] for m in means.values())
    left.set_xlim(low - 0.2, max(m[2] for m in means.values()) + 0.1)
    left.set_xlabel("per-token NLL of the gold output (nats)")
    comparisons = result["test"]["comparisons"]
    bars(right, list(comparisons), [(c["mean"], c["lo"], c["hi"]) for c in comparisons.values()])
    right.axvline(0, color="grey", linewidth=0.8)
    right.set_xlabel("paired difference a - b (nats/token; < 0: a better)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
