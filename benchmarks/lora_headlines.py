"""Per-user LoRA (OPPU) beside Fints on headlines: per-token NLL of the gold headlines.

Headlines (``short_description`` -> ``headline``), SmolLM2, the headline prompt without
examples (the one generation and LoRA training use). Per author (>= 20 articles, by
date): the last ``--test`` articles are test queries, the ``--val`` before them
validation queries, the ``--history`` before those the history. Trained through the
product's paths (``fints.adapters.jobs``: ``fints lora train-task`` / ``fints lora
train --task``) in a temporary store, with the authors' steering dictionaries built by
``Personalizer.add_history`` (context contrast, default sites and encoder).

Rows (teacher-forced NLL of the gold headline, ``<|im_end|>`` included):

* base: no adapter, no steering;  steering: Fints alone (the engine's default settings);
* task LoRA: one adapter trained on all authors' histories;  task LoRA + steering;
* per-user LoRA: OPPU, the author's adapter on top of the task adapter;
* per-user LoRA + steering: the plug-in mode;
* other user's LoRA: another author's adapter (fixed per author): the control.

Paired differences get 95% bootstrap intervals resampling users, sign-flip p over users
and the MDE (:func:`fints.benchmark.stats.user_bootstrap`). Also per user: training time
and storage (adapter bytes vs dictionary bytes).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lora_headlines.py --authors 12
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fints.adapters.config import LoraTrainConfig
from fints.adapters.host import AdapterHost
from fints.adapters.jobs import Job, train_task, train_users
from fints.benchmark.stats import user_bootstrap
from fints.benchmark.tasks import SplitConfig, Task, load_headlines
from fints.engine import GenerationRequest, Personalizer
from fints.extraction.config import ExtractionConfig
from fints.models import LoadedModel, load_model
from fints.modes import SteeringAddition
from fints.prompts import build_prompt_ids, get_template
from fints.sites import Site
from fints.store import Store
from fints.target_nll import target_nll

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "news_headlines.jsonl"
ROWS = (
    "base",
    "steering",
    "task LoRA",
    "task LoRA + steering",
    "per-user LoRA",
    "per-user LoRA + steering",
    "other user's LoRA",
)
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


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--authors", type=int, default=12)
    parser.add_argument("--history", type=int, default=16)
    parser.add_argument("--test", type=int, default=4)
    parser.add_argument("--val", type=int, default=2)
    parser.add_argument("--task-lr", type=float, default=1e-4)
    parser.add_argument("--user-lr", type=float, default=1e-4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lora-headlines"))
    parser.add_argument("--plot-only", action="store_true", help="redraw --out's figure")
    return parser.parse_args()


def load_task(args: argparse.Namespace) -> Task:
    split = SplitConfig(
        min_items=20, n_test=args.test, n_val=args.val, max_history=args.history, seed=0
    )
    task = load_headlines(args.data, split)
    return task.subset_users(sorted(task.users)[: args.authors])


class Scorer:
    """NLL of a user's queries under an adapter (by name in the host) and steering."""

    def __init__(self, model: LoadedModel, engine: Personalizer, host: AdapterHost) -> None:
        self.model, self.engine, self.host = model, engine, host
        self.template = get_template("headline")

    def examples(self, queries: Sequence[Any]) -> tuple[list[list[int]], list[list[int]]]:
        tok = self.model.tokenizer
        prompts = [build_prompt_ids(tok, self.template, q.input) for q in queries]
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


def score_split(
    scorer: Scorer, task: Task, split: str, names: dict[str, str], task_name: str
) -> dict[str, Any]:
    rows: dict[str, list[float]] = {r: [] for r in ROWS}
    users: list[str] = []
    for user in sorted(task.users):
        queries = getattr(task.users[user], split)
        vectors = scorer.steering(user, queries)
        other = task.wrong_user(user)
        users += [user] * len(queries)
        rows["base"] += scorer.nll(queries, None, None)
        rows["steering"] += scorer.nll(queries, None, vectors)
        rows["task LoRA"] += scorer.nll(queries, task_name, None)
        rows["task LoRA + steering"] += scorer.nll(queries, task_name, vectors)
        rows["per-user LoRA"] += scorer.nll(queries, names[user], None)
        rows["per-user LoRA + steering"] += scorer.nll(queries, names[user], vectors)
        rows["other user's LoRA"] += scorer.nll(queries, names[other], None)
    return {"users": users, "rows": rows}


def summary(scored: dict[str, Any]) -> dict[str, Any]:
    users, rows = scored["users"], scored["rows"]
    zeros = np.zeros(len(users))
    means = {r: user_bootstrap(v, zeros, users) for r, v in rows.items()}
    out: dict[str, Any] = {
        "means": {r: [d.mean, d.lo, d.hi] for r, d in means.items()},
        "comparisons": {},
    }
    for a, b in COMPARISONS:
        d = user_bootstrap(rows[a], rows[b], users)
        per_user: dict[str, list[float]] = {}
        for u, x, y in zip(users, rows[a], rows[b], strict=True):
            per_user.setdefault(u, []).append(x - y)
        better = sum(1 for v in per_user.values() if np.mean(v) < 0)
        out["comparisons"][f"{a} - {b}"] = {
            "mean": d.mean,
            "lo": d.lo,
            "hi": d.hi,
            "p": d.p,
            "mde": d.mde,
            "users_a_better": f"{better}/{len(per_user)}",
        }
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = ["| row | NLL (nats/token), test | 95 % CI (users) | validation |", "|---|---|---|---|"]
    test, val = result["test"]["means"], result["validation"]["means"]
    for row in ROWS:
        m, lo, hi = test[row]
        lines.append(f"| {row} | {m:.3f} | [{lo:.3f}, {hi:.3f}] | {val[row][0]:.3f} |")
    lines += [
        "",
        "| a - b | diff | 95 % CI | users a better | p | MDE |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in result["test"]["comparisons"].items():
        lines.append(
            f"| {name} | {c['mean']:+.3f} | [{c['lo']:+.3f}, {c['hi']:+.3f}] | "
            f"{c['users_a_better']} | {c['p']:.4f} | {c['mde']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
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
    bars(left, list(ROWS), [tuple(means[r]) for r in ROWS])
    low = min(means[r][1] for r in ROWS)
    left.set_xlim(low - 0.2, max(means[r][2] for r in ROWS) + 0.1)
    left.set_xlabel("per-token NLL of the gold headline (nats)")
    comparisons = result["test"]["comparisons"]
    bars(right, list(comparisons), [(c["mean"], c["lo"], c["hi"]) for c in comparisons.values()])
    right.axvline(0, color="grey", linewidth=0.8)
    right.set_xlabel("paired difference a - b (nats/token; < 0: a better)")
    fig.suptitle(
        f"Headlines, SmolLM2, {result['authors']} authors, {result['queries']} test queries; "
        "95% CIs resample users"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    args = arguments()
    if args.plot_only:
        plot(json.loads((args.out / "results.json").read_text()), args.out / "nll.png")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = load_model()
    task = load_task(args)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store.sqlite")
        # the paper's context contrast, as measured (the product's default is "trained")
        extraction = ExtractionConfig.for_model(model.num_layers, method="context")
        engine = Personalizer(model, store, template="headline", extraction=extraction)
        timings: dict[str, dict[str, float]] = {}
        for user in sorted(task.users):
            t0 = time.perf_counter()
            engine.add_history(user, task.users[user].history)
            timings[user] = {"dictionary_seconds": time.perf_counter() - t0}
        template = get_template("headline")
        task_config = LoraTrainConfig(lr=args.task_lr, epochs=args.epochs)
        user_config = LoraTrainConfig(lr=args.user_lr, epochs=args.epochs)
        t0 = time.perf_counter()
        stored_task = train_task(Job(model, store, template, task_config), "headlines")
        task_seconds = time.perf_counter() - t0
        done = train_users(
            Job(model, store, template, user_config), sorted(task.users), task="headlines"
        )
        host = AdapterHost(model, capacity=len(done) + 1)
        names = {d.user: host.load(d.stored.folder) for d in done}
        task_name = host.load(stored_task.folder)
        scorer = Scorer(model, engine, host)
        result: dict[str, Any] = {
            "command": "benchmarks/lora_headlines.py "
            + " ".join(
                f"--{k.replace('_', '-')} {v}"
                for k, v in vars(args).items()
                if k not in ("out", "plot_only")
            ),
            "authors": len(task.users),
            "queries": len(task.queries("test")),
            "task_config": task_config.to_dict(),
            "user_config": user_config.to_dict(),
            "task_train_seconds": task_seconds,
            "task_items": stored_task.meta.items,
        }
        for split in ("validation", "test"):
            scored = score_split(scorer, task, split, names, task_name)
            result[split] = summary(scored)
            result[split]["per_query"] = scored
        per_user = {}
        for d in done:
            dictionary = engine.dictionary(d.user)
            assert dictionary is not None
            folder = Path(tmp) / "export" / d.user
            dictionary.save(folder, include_texts=False)
            per_user[d.user] = {
                **timings[d.user],
                "items": d.trained.items,
                "lora_seconds": d.trained.seconds,
                "final_loss": d.trained.epoch_losses[-1],
                "adapter_file_bytes": d.stored.bytes,
                "user_part_bytes": d.trained.weights.parameters * 4,
                "dictionary_vector_bytes": (folder / "vectors.safetensors").stat().st_size,
                "dictionary_entries": len(dictionary),
            }
        result["per_user"] = per_user
        store.close()
    result["seconds"] = time.perf_counter() - started
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    (args.out / "report.md").write_text(markdown(result))
    plot(result, args.out / "nll.png")
    print(markdown(result))
    medians = {
        k: float(np.median([u[k] for u in per_user.values()]))
        for k in next(iter(per_user.values()))
    }
    print(json.dumps({"median_per_user": medians, "seconds": result["seconds"]}, indent=1))


if __name__ == "__main__":
    main()
