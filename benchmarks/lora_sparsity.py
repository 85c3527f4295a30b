"""Data sparsity (issue 23): per-user LoRA (OPPU) beside Fints at 5 % .. 100 % of history.

Headlines (``short_description`` -> ``headline``), SmolLM2, the headline prompt without
examples; metric: per-token NLL of the gold test headline (``<|im_end|>`` included),
teacher-forced, paired per query (``lora_headlines.Scorer``).

Authors: those with >= ``--history`` + ``--val`` + ``--test`` (40 + 2 + 4) articles, by
name, the first ``--authors``. By date: the last 4 are test queries, the 2 before are
validation (unused: nothing is chosen here), the 40 before those the history. Fraction
``f`` keeps the MOST RECENT ``round(f * 40)`` history items (2, 4, 10, 20, 40 at 5, 10,
25, 50, 100 %), so the shares are nested. Every per-user part is trained on that share.

Shared parts, trained once on OTHER authors (those with 20-45 articles, who are never
evaluated; their 16 articles before their last 4), so that no evaluated author's history
reaches a tenant-level part and 5 % really is 2 items:

* task LoRA: ``fints.adapters.jobs.train_task`` (r 8, q_proj + v_proj, 2 epochs, lr 1e-3,
  the setting chosen on validation in BENCHMARKS "Per-user LoRA (OPPU)");
* shared vector: ``fints.vector_training.train_vectors`` with the product's shared stage
  (``TrainedConfig().training("shared")``: 60 Adam steps, lr 0.1, batch 16) at 15.block.

Rows per author and fraction: per-user LoRA (OPPU: ``train_users(..., task=...)`` on the
kept share, lr 1e-3, 2 epochs, stored with the task part), Fints = shared + per-user
delta (the product's user stage: 4 Adam steps, lr 0.05, batch 16, no early stopping,
from the shared vector), and with ``--dictionary`` the context-contrast dictionary
(``Personalizer.build``, the paper's method, retrieval per query). Rows that do not
depend on the fraction: none, task LoRA, shared vector. Control: other author's LoRA (each
author's queries under another author's adapter of the same share, the derangement of
``trained_probe.wrong_users``): how much of the LoRA's gain is the author, not training.

Pre-registered comparisons (Holm over these eight; a - b, < 0: a better):

1-5. Fints (shared + delta) - per-user LoRA, at each fraction;
6.   per-user LoRA at 5 % - per-user LoRA at 100 % (does the LoRA drop?);
7.   Fints at 5 % - Fints at 100 % (does Fints drop?);
8.   (Fints 5 % - Fints 100 %) - (LoRA 5 % - LoRA 100 %): Fints holds up where the LoRA drops.

Reported without correction: per-user LoRA - task LoRA, - other author's LoRA, Fints -
shared (and dictionary - none) at each fraction. Intervals: 95 % bootstrap resampling
authors, sign-flip p over authors, MDE at 80 % power (``lora_vs_vector.user_stats``). Per
author and fraction: training seconds (one thread), adapter bytes vs vector bytes. Results
are cached per (author, fraction, row) under ``--out``/cache (with the store holding the
adapters), so a rerun resumes.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/lora_sparsity.py --authors 12 \
        --dictionary
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lora_headlines import DATA, Scorer
from lora_vs_vector import read_json, shared_rows, user_stats, write_json
from trained_probe import cached_training, wrong_users
from trained_report import comparison_line

from fints.adapters.config import LoraTrainConfig
from fints.adapters.host import AdapterHost
from fints.adapters.jobs import Job, train_task, train_users
from fints.benchmark import tasks
from fints.benchmark.stats import holm
from fints.engine import Personalizer
from fints.extraction.config import ExtractionConfig
from fints.extraction.trained import TrainedConfig
from fints.models import load_model
from fints.prompts import get_template
from fints.sites import parse_sites
from fints.store import Store
from fints.vector_training import TrainedVectors, train_vectors

OUT = Path("benchmarks/results/lora-sparsity")
FRACTIONS = (0.05, 0.10, 0.25, 0.50, 1.00)
TENANT, TASK = "default", "headlines"
LORA, FINTS, DICT = "per-user LoRA", "Fints (shared + delta)", "Fints dictionary (context)"
OTHER = "other author's LoRA"  # control: another author's adapter of the same fraction
FIXED_ROWS = ("none", "task LoRA", "shared vector")
FILES = {LORA: "lora", FINTS: "fints", DICT: "dict"}  # cache file prefixes
#: the cost table: label -> (row, field of its cells)
COST = {
    "per-user LoRA training (s)": (LORA, "seconds"),
    "Fints delta training (s)": (FINTS, "seconds"),
    "dictionary extraction (s)": (DICT, "seconds"),
    "per-user LoRA, stored bytes (user + task part)": (LORA, "adapter_bytes"),
    "per-user LoRA, user part (fp32 bytes)": (LORA, "user_part_bytes"),
    "Fints vector (shared + delta) bytes": (FINTS, "vector_bytes"),
    "dictionary vectors.safetensors bytes": (DICT, "vector_bytes"),
}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--authors", type=int, default=12)
    parser.add_argument("--fractions", default=",".join(f"{f:g}" for f in FRACTIONS))
    parser.add_argument("--history", type=int, default=40)
    parser.add_argument("--test", type=int, default=4)
    parser.add_argument("--val", type=int, default=2)
    parser.add_argument("--pool-history", type=int, default=16, help="per other author")
    parser.add_argument("--lr", type=float, default=1e-3, help="task and per-user LoRA")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--sites", default="15.block")
    parser.add_argument("--dictionary", action="store_true", help="also the context dictionary")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def kept(history: list[Any], fraction: float) -> list[Any]:
    """The most recent ``round(fraction * len)`` items (at least one): nested shares."""
    return history[-max(1, round(fraction * len(history))) :]


Splits = dict[str, tasks.UserSplit]


def splits(args: argparse.Namespace) -> tuple[Splits, Splits]:
    """(evaluated authors, the other authors the shared parts are trained on)."""
    records = tasks.headline_records(tasks.read_jsonl(args.data), str(args.data))
    longest = args.history + args.val + args.test
    config = tasks.SplitConfig(longest, args.test, args.val, max_history=args.history)
    long = tasks.time_split(records, config)
    evaluated = {n: long[n] for n in sorted(long)[: args.authors]}
    config = tasks.SplitConfig(20, args.test, n_val=0, max_history=args.pool_history)
    pool = {n: s for n, s in tasks.time_split(records, config).items() if n not in long}
    seen = {i.item_id for s in long.values() for i in s.history}
    assert not seen & {i.item_id for s in pool.values() for i in s.history}, "shared record"
    return evaluated, pool


def summary(fractions: list[float], scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per-fraction comparisons and the pre-registered family (Holm)."""
    lo, hi = f"{min(fractions):g}", f"{max(fractions):g}"

    def at(row: str, f: float | str) -> np.ndarray:
        return scores[row] if row in FIXED_ROWS else scores[f"{row} @ {float(f):g}"]

    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for f in fractions:
        pairs[f"Fints - per-user LoRA @ {f:g}"] = (at(FINTS, f), at(LORA, f))
    pairs[f"per-user LoRA @ {lo} - @ {hi}"] = (at(LORA, lo), at(LORA, hi))
    pairs[f"Fints @ {lo} - @ {hi}"] = (at(FINTS, lo), at(FINTS, hi))
    pairs[f"Fints drop - LoRA drop ({lo} vs {hi})"] = (
        at(FINTS, lo) - at(FINTS, hi),
        at(LORA, lo) - at(LORA, hi),
    )
    pre = list(pairs)
    for f in fractions:
        pairs[f"per-user LoRA - task LoRA @ {f:g}"] = (at(LORA, f), at("task LoRA", f))
        if f"{OTHER} @ {f:g}" in scores:
            pairs[f"per-user LoRA - {OTHER} @ {f:g}"] = (at(LORA, f), at(OTHER, f))
        pairs[f"Fints - shared vector @ {f:g}"] = (at(FINTS, f), at("shared vector", f))
        if f"{DICT} @ {f:g}" in scores:
            pairs[f"Fints dictionary - none @ {f:g}"] = (at(DICT, f), at("none", f))
    pairs["task LoRA - none"] = (scores["task LoRA"], scores["none"])
    pairs["shared vector - none"] = (scores["shared vector"], scores["none"])
    pairs["task LoRA - shared vector"] = (scores["task LoRA"], scores["shared vector"])
    out = {k: user_stats(a, b, seed=i) for i, (k, (a, b)) in enumerate(pairs.items())}
    for k, p in holm({k: out[k]["p"] for k in pre}).items():
        out[k]["p_holm"] = p
    return out


def markdown(result: dict[str, Any]) -> str:
    n, fractions, items = result["authors"], result["fractions"], result["items_per_fraction"]
    head = " | ".join(f"{f * 100:g} % ({items[str(f)]} items)" for f in fractions)

    def table(first: str, cells: dict[str, list[Any]], fmt: Callable[[float], str]) -> list[str]:
        rows = [f"| {k} | " + " | ".join(map(fmt, v)) + " |" for k, v in cells.items()]
        return [f"| {first} | {head} |", "|---|" + "---|" * len(fractions), *rows, ""]

    means = result["mean_nll"]
    nll = {
        row: [means.get(f"{row} @ {f:g}", means.get(row)) for f in fractions]
        for row in [*FIXED_ROWS, LORA, OTHER, FINTS, DICT]
        if row in means or f"{row} @ {fractions[0]:g}" in means
    }
    cost = {
        label: [result["cost"][f"{f:g}"][label] for f in fractions]
        for label in COST
        if label in result["cost"][f"{fractions[0]:g}"]
    }
    return "\n".join([
        "# Data sparsity: per-user LoRA vs Fints (headlines, SmolLM2)", "",
        f"`{result['command']}`", "",
        f"{n} authors, {result['queries']} test headlines; per-token NLL (nats/token); the most "
        f"recent share of each author's {result['args']['history']}-item history. Shared parts "
        f"trained on {result['pool_authors']} other authors ({result['pool_items']} items).", "",
        *table("row", nll, lambda c: f"{c:.4f}"),
        "| a - b | diff | 95 % CI | MDE | authors a better | p | p (Holm) |",
        "|---|---|---|---|---|---|---|",
        *[
            comparison_line(f"{k} (pre-registered)" if "p_holm" in c else k, c,
                            c["users_a_better"], n)
            for k, c in result["comparisons"].items()
        ], "",
        "Per user (medians over authors; one thread): training seconds and stored bytes", "",
        *table("", cost, lambda c: f"{c:,.1f}" if c < 1000 else f"{c:,.0f}"),
        *[f"- {x}" for x in result["notes"]],
    ]) + "\n"  # fmt: skip


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions, means = result["fractions"], result["mean_nll"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = {"none": "grey", "task LoRA": "C0", "shared vector": "C1", LORA: "C0", FINTS: "C1"}
    colors |= {DICT: "C2", OTHER: "C9"}
    for row in FIXED_ROWS:
        left.axhline(means[row], linestyle="--", linewidth=1, label=row, color=colors[row])
    for row in (LORA, OTHER, FINTS, DICT):
        if f"{row} @ {fractions[0]:g}" in means:
            ys = [means[f"{row} @ {f:g}"] for f in fractions]
            left.plot(fractions, ys, "o-", color=colors[row], label=row)
    left.set_ylabel("mean per-token NLL of the gold headline")
    shown = ("per-user LoRA - task LoRA", "Fints - shared vector", "Fints dictionary - none")
    for name, color, dx in zip(shown, ("C0", "C1", "C2"), (0.96, 1.0, 1.04), strict=True):
        cs = [result["comparisons"].get(f"{name} @ {f:g}") for f in fractions]
        if None in cs:
            continue
        m = np.array([c["mean"] for c in cs])
        err = np.array([[c["mean"] - c["lo"], c["hi"] - c["mean"]] for c in cs]).T
        x = np.array(fractions) * dx
        right.errorbar(x, m, yerr=err, fmt="o-", color=color, capsize=3, label=name)
    right.axhline(0, color="grey", linewidth=0.8)
    right.set_ylabel("per-user part over its base (nats/token, 95% CI)")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(fractions, [f"{f * 100:g}%" for f in fractions])
        ax.set_xlabel("share of the history (most recent)")
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0.93))
    right.legend(fontsize=8)
    per = result["queries"] // result["authors"]
    fig.suptitle(f"Headlines, SmolLM2, {result['authors']} authors x {per} test headlines")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@dataclasses.dataclass
class Bench:
    """What the per-user cells are trained and scored with."""

    job: Job
    scorer: Scorer
    shared: TrainedVectors
    trained: TrainedConfig
    task_name: str

    def fixed(self, queries: list[Any]) -> dict[str, Any]:
        """The rows that do not depend on the fraction."""
        return {
            "none": self.scorer.nll(queries, None, None),
            "task LoRA": self.scorer.nll(queries, self.task_name, None),
            "shared vector": self.scorer.nll(queries, None, self.shared.rows(1)),
        }

    def lora(self, user: str, queries: list[Any], items: list[Any]) -> dict[str, Any]:
        """OPPU: the user's adapter on the task adapter, through ``train_users``."""
        (done,) = train_users(self.job, [user], task=TASK)
        name = self.scorer.host.load(done.stored.folder)
        nll = self.scorer.nll(queries, name, None)
        self.scorer.host.unload(name)
        return {
            "nll": nll,
            "seconds": done.trained.seconds,
            "items": done.trained.items,
            "adapter_bytes": done.stored.bytes,
            "user_part_bytes": done.trained.weights.parameters * 4,
            "epoch_losses": done.trained.epoch_losses,
        }

    def other(self, user: str, queries: list[Any]) -> dict[str, Any]:
        """``queries`` under ``user``'s stored adapter (trained before)."""
        stored = self.job.adapters.user_adapter(TENANT, user)
        assert stored is not None, user
        name = self.scorer.host.load(stored.folder)
        nll = self.scorer.nll(queries, name, None)
        self.scorer.host.unload(name)
        return {"nll": nll}

    def fints(self, user: str, queries: list[Any], items: list[Any]) -> dict[str, Any]:
        """Shared + delta: the product's user stage from the shared vector."""
        t0 = time.perf_counter()
        sites, shared = self.shared.sites, self.shared.values
        config = self.trained.training("user")
        delta = train_vectors(
            self.job.model, sites, self.job.examples(items), init=shared, config=config
        )
        seconds = time.perf_counter() - t0
        return {
            "nll": self.scorer.nll(queries, None, shared_rows(delta.values, sites, 1)),
            "seconds": seconds,
            "items": len(items),
            "vector_bytes": delta.values.numel() * 4,
            "delta_norm": float((delta.values - shared).norm()),
        }

    def dictionary(self, user: str, queries: list[Any], items: list[Any]) -> dict[str, Any]:
        """The context-contrast dictionary (``Personalizer.build``), retrieval per query."""
        engine = self.scorer.engine
        t0 = time.perf_counter()
        engine.build(user, progress=False)
        seconds = time.perf_counter() - t0
        built = engine.dictionary(user)
        assert built is not None
        with tempfile.TemporaryDirectory() as tmp:
            built.save(Path(tmp), include_texts=False)
            size = (Path(tmp) / "vectors.safetensors").stat().st_size
        vectors = self.scorer.steering(user, queries)
        nll = self.scorer.nll(queries, None, vectors)
        return {"nll": nll, "seconds": seconds, "items": len(items), "vector_bytes": size}


def cached(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    data = read_json(path)
    if data is None:
        data = compute()
        write_json(path, data)
    return data


def main() -> None:
    args = arguments()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    fractions = sorted(float(f) for f in args.fractions.split(","))
    model = load_model()
    evaluated, pool = splits(args)
    cache = args.out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    store = Store(cache / "store.sqlite")
    lora_config = LoraTrainConfig(lr=args.lr, epochs=args.epochs)
    trained = TrainedConfig()
    made_with = [model.fingerprint, tasks.file_sha256(args.data), args.history, args.test, args.val,
                 sorted(pool), args.pool_history, lora_config.to_dict(),
                 dataclasses.asdict(trained), args.sites]  # fmt: skip
    prefix = hashlib.sha256(json.dumps(made_with, default=str).encode()).hexdigest()[:16]
    job = Job(model, store, get_template("headline"), lora_config, TENANT)

    # the shared parts, on the other authors only
    for name, s in pool.items():
        store.add_items(TENANT, f"pool: {name}", s.history)
    pool_users = [f"pool: {n}" for n in sorted(pool)]
    pool_items = [i for u in pool_users for i in store.items(TENANT, u)]
    if job.adapters.task_adapter(TENANT, TASK) is None:
        (cache / f"task-{prefix}.json").unlink(missing_ok=True)

    def task() -> dict[str, Any]:
        t0 = time.perf_counter()
        stored = train_task(job, TASK, users=pool_users)
        return {"seconds": time.perf_counter() - t0, "items": stored.meta.items,
                "bytes": stored.bytes}  # fmt: skip

    task_meta = cached(cache / f"task-{prefix}.json", task)
    stored_task = job.adapters.task_adapter(TENANT, TASK)
    assert stored_task is not None
    print(f"task LoRA: {task_meta}; {time.perf_counter() - start:.0f}s", flush=True)
    shared = cached_training(
        cache / f"shared-{prefix}.pt",
        lambda: train_vectors(model, parse_sites(args.sites), job.examples(pool_items),
                              config=trained.training("shared"), progress=True),
    )  # fmt: skip
    print(f"shared vector: norm {shared.values.norm():.1f}; {time.perf_counter() - start:.0f}s")
    host = AdapterHost(model, capacity=4)
    task_name = host.load(stored_task.folder)
    extraction = ExtractionConfig.for_model(model.num_layers, method="context")
    engine = Personalizer(model, store, template="headline", extraction=extraction)
    scorer = Scorer(model, engine, host)
    bench = Bench(job, scorer, shared, trained, task_name)
    methods = {LORA: bench.lora, FINTS: bench.fints}
    if args.dictionary:
        methods[DICT] = bench.dictionary

    scores: dict[str, list[list[float]]] = {}
    per_author: dict[str, dict[str, Any]] = {}
    for n, (author, split) in enumerate(evaluated.items()):
        queries = split.test
        tag = hashlib.sha256(f"{prefix}|{author}".encode()).hexdigest()[:12]
        fixed = cached(cache / f"fixed-{tag}.json", partial(bench.fixed, queries))
        for row in FIXED_ROWS:
            scores.setdefault(row, []).append(fixed[row])
        per_author[author] = {}
        for f in fractions:
            user, items = f"{author} [{f * 100:g}%]", kept(split.history, f)
            store.add_items(TENANT, user, items)
            key = hashlib.sha256(f"{prefix}|{author}|{f}".encode()).hexdigest()[:12]
            cell = {
                row: cached(cache / f"{FILES[row]}-{key}.json",
                            partial(method, user, queries, items))
                for row, method in methods.items()
            }  # fmt: skip
            for row, c in cell.items():
                scores.setdefault(f"{row} @ {f:g}", []).append(c["nll"])
            per_author[author][f"{f:g}"] = {
                r: {k: v for k, v in c.items() if k != "nll"} for r, c in cell.items()
            }
            print(f"[{n + 1}/{len(evaluated)}] {author} {f:g} ({len(items)} items): "
                  + " ".join(f"{r} {np.mean(c['nll']):.4f} ({c['seconds']:.0f}s)"
                             for r, c in cell.items())
                  + f"; {time.perf_counter() - start:.0f}s", flush=True)  # fmt: skip
    # the control: each author's queries under another author's adapter of the same share
    other = wrong_users(list(evaluated), 0)
    for author, split in evaluated.items():
        for f in fractions:
            key = hashlib.sha256(f"{prefix}|{author}|{other[author]}|{f}".encode()).hexdigest()
            scores.setdefault(f"{OTHER} @ {f:g}", []).append(
                cached(cache / f"other-{key[:12]}.json",
                       partial(bench.other, f"{other[author]} [{f * 100:g}%]", split.test))["nll"]
            )  # fmt: skip
    store.close()

    arrays = {k: np.array(v) for k, v in scores.items()}
    cost = {
        f"{f:g}": {
            label: float(np.median([per_author[a][f"{f:g}"][row][field] for a in evaluated]))
            for label, (row, field) in COST.items()
            if row in methods
        }
        for f in fractions
    }
    result: dict[str, Any] = {
        "command": " ".join(shlex.quote(x) for x in sys.argv),
        "args": {k: str(v) for k, v in vars(args).items()},
        "authors": len(evaluated),
        "queries": int(arrays["none"].size),
        "fractions": fractions,
        "items_per_fraction": {str(f): len(kept(list(range(args.history)), f)) for f in fractions},
        "pool_authors": len(pool),
        "pool_items": len(pool_items),
        "task_lora": task_meta,
        "shared_vector": {"norm": float(shared.values.norm()), "config": shared.config.to_dict()},
        "lora_config": lora_config.to_dict(),
        "delta_config": trained.training("user").to_dict(),
        "mean_nll": {k: float(v.mean()) for k, v in arrays.items()},
        "comparisons": summary(fractions, arrays),
        "cost": cost,
        "per_author": per_author,
        "per_query_nll": {k: v.tolist() for k, v in arrays.items()},
        "names": list(evaluated),
        "other_author": other,
        "notes": [
            f"task LoRA: {task_meta['items']} items of the other authors, "
            f"{task_meta['seconds']:.0f} s to train (2 epochs), {task_meta['bytes']:,} bytes",
            "training and extraction summed over the cells (one thread): "
            + ", ".join(
                f"{r} {sum(c[r]['seconds'] for a in per_author.values() for c in a.values()):.0f} s"
                for r in methods
            ),
            f"this invocation: {time.perf_counter() - start:.0f} s on {args.threads} thread(s) "
            "(cached cells are not recomputed)",
        ],
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "report.md").write_text(markdown(result))
    plot(result, args.out / "nll.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
