"""Per-user LoRA (OPPU) beside Fints on headlines, abstracts or persona: NLL, ROUGE, judge.

``--task headlines`` (``short_description`` -> ``headline``, the headline prompt without
examples): per author (>= 20 articles, by date) the last ``--test`` articles are test
queries, the ``--val`` before them validation queries, the ``--history`` before those
the history. ``--task abstracts`` (title -> abstract, >= 20 papers): the same split.
``--task persona``: each of moodswapper's moods is a user
(:func:`fints.benchmark.persona.load_persona`, the generic prompt; by default 24
history answers, 3 validation and 12 test prompts per mood, the split of
``trained_probe.py --task persona``). SmolLM2, or ``--model``. Trained through the product's paths
(``fints.adapters.jobs``: ``fints lora train-task`` / ``fints lora train --task``) in a
temporary store, with the users' steering dictionaries built by
``Personalizer.add_history`` (``--contrast``, default context; default sites and encoder).

Rows (teacher-forced NLL of the gold output, ``<|im_end|>`` included):

* base: no adapter, no steering;  steering: Fints alone (the engine's default settings);
* task LoRA: one adapter trained on all users' histories;  task LoRA + steering;
* per-user LoRA: OPPU, the user's adapter on top of the task adapter;
* per-user LoRA + steering: the plug-in mode;
* other user's LoRA: another user's adapter (fixed per user): the control;
* with ``--through-adapter`` (``--contrast trained``; NLL only): per-user LoRA + a vector
  trained from zero on the user's history through their adapter (the plug-in trained to
  stack; the dictionaries' vectors were trained on the base model).

``--generate``: each row's greedy answers to the test queries (``--max-new-tokens``,
the engine's ``prepare``/``decode``, see ``lora_common.py``), scored by ROUGE-1/L
against the gold output and by the judge: the TF-IDF attribution classifier fitted on
the users' history outputs (as ``trained_probe.py --generate``; for persona the mood
judge), and for persona also the held-out mood judge (the task's classifier pairs).

Paired differences get 95% bootstrap intervals resampling users, sign-flip p over users
and the MDE (:func:`fints.benchmark.stats.user_bootstrap`). Also per user: training time
and storage (adapter bytes vs dictionary bytes).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lora_headlines.py --authors 12
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lora_headlines.py --task persona \\
        --task-lr 1e-3 --user-lr 1e-3 --generate --out benchmarks/results/lora-persona
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lora_common import (
    ROWS,
    RowScorer,
    Scorer,
    generation_scores,
    markdown,
    plot,
    summary,
    train_through,
)

from fints.adapters.config import LoraTrainConfig
from fints.adapters.jobs import Job, train_task, train_users
from fints.adapters.mode import LoraMode
from fints.benchmark.persona import PersonaConfig, load_persona
from fints.benchmark.tasks import SplitConfig, Task, load_abstracts, load_headlines
from fints.engine import Personalizer
from fints.extraction.config import ExtractionConfig
from fints.extraction.trained import TrainedConfig
from fints.generation import GenerationOptions
from fints.models import load_model
from fints.store import Store

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
#: the real-data task: (its file under DATA, its loader)
FILES = {
    "headlines": ("news_headlines.jsonl", load_headlines),
    "abstracts": ("arxiv_abstracts.jsonl", load_abstracts),
}
#: per task, what an argument left out means
DEFAULTS: dict[str, dict[str, Any]] = {
    "headlines": {"authors": 12, "history": 16, "test": 4, "val": 2, "max_new_tokens": 32},
    "abstracts": {"authors": 12, "history": 16, "test": 4, "val": 2, "max_new_tokens": 128},
    "persona": {"authors": 9, "history": 24, "test": 12, "val": 3, "max_new_tokens": 64},
}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=sorted(DEFAULTS), default="headlines")
    parser.add_argument("--data", type=Path, help="the task's JSONL; persona: the mood folder")
    parser.add_argument("--authors", type=int, help="users (the first by name)")
    parser.add_argument("--history", type=int)
    parser.add_argument("--test", type=int)
    parser.add_argument("--val", type=int)
    parser.add_argument("--model", default=None, help="fints model name, HF id or folder")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--task-lr", type=float, default=1e-4)
    parser.add_argument("--user-lr", type=float, default=1e-4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--contrast", default="context", help="the dictionaries' method")
    parser.add_argument("--generate", action="store_true", help="also ROUGE and the judge")
    parser.add_argument(
        "--through-adapter",
        action="store_true",
        help="also (NLL) each user's adapter with a vector trained through it (trained method)",
    )
    parser.add_argument("--max-new-tokens", type=int, help="default: 32 headlines, 64 persona")
    parser.add_argument("--batch-size", type=int, default=12, help="generation batch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/lora-TASK")
    parser.add_argument("--plot-only", action="store_true", help="redraw --out's figure")
    args = parser.parse_args()
    for name, value in DEFAULTS[args.task].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.out = args.out or Path(f"benchmarks/results/lora-{args.task}")
    return args


def load_task(args: argparse.Namespace) -> Task:
    if args.task == "persona":
        config = PersonaConfig(n_test=args.test, n_val=args.val, max_history=args.history)
        task = load_persona(args.data, config, max_new_tokens=args.max_new_tokens)
    else:
        split = SplitConfig(
            min_items=20, n_test=args.test, n_val=args.val, max_history=args.history, seed=0
        )
        name, loader = FILES[args.task]
        task = loader(args.data or DATA / name, split, max_new_tokens=args.max_new_tokens)
    return task.subset_users(sorted(task.users)[: args.authors])


def score_split(scorer: RowScorer, task: Task, split: str) -> dict[str, Any]:
    """Per row, the NLL of every query of ``split`` (users in order); and their users."""
    rows: dict[str, list[float]] = {r: [] for r in scorer.rows}
    users: list[str] = []
    for user in sorted(task.users):
        queries = getattr(task.users[user], split)
        plan = scorer.scorer.steering(user, queries)
        users += [user] * len(queries)
        for row in scorer.rows:
            rows[row] += scorer.nll(row, user, queries, plan)
    return {"users": users, "rows": rows}


def generate(scorer: RowScorer, task: Task, args: argparse.Namespace) -> dict[str, Any]:
    """Each row's answers to the test queries and their scores, summarized over users."""
    pairs = [(u, q) for u in sorted(task.users) for q in task.users[u].test]
    users = [u for u, _ in pairs]
    options = GenerationOptions(max_new_tokens=args.max_new_tokens)
    texts: dict[str, list[str]] = {}
    for row in ROWS:
        t0 = time.perf_counter()
        texts[row] = scorer.generate(row, pairs, options, args.batch_size)
        print(f"generated {row}: {time.perf_counter() - t0:.0f}s", flush=True)
    scores = generation_scores(texts, [q.reference for _, q in pairs], task)
    out: dict[str, Any] = {
        m: summary(users, rows, lower_better=False) for m, rows in scores.items()
    }
    out["per_query"] = {"users": users, "scores": scores}
    out["answers"] = texts
    return out


def main() -> None:
    args = arguments()
    if args.plot_only:
        saved = json.loads((args.out / "results.json").read_text())
        plot(saved, args.out / "nll.png", title(saved, args.task))
        return
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = load_model(args.model, dtype=args.dtype)
    task = load_task(args)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store.sqlite")
        # the paper's context contrast, as measured (the product's default is "trained")
        extraction = ExtractionConfig.for_model(model.num_layers, method=args.contrast)
        engine = Personalizer(model, store, template=task.template, extraction=extraction)
        timings: dict[str, dict[str, float]] = {}
        for user in sorted(task.users):
            t0 = time.perf_counter()
            engine.add_history(user, task.users[user].history)
            timings[user] = {"dictionary_seconds": time.perf_counter() - t0}
        print(f"dictionaries: {time.perf_counter() - started:.0f}s", flush=True)
        task_config = LoraTrainConfig(lr=args.task_lr, epochs=args.epochs)
        user_config = LoraTrainConfig(lr=args.user_lr, epochs=args.epochs)
        t0 = time.perf_counter()
        stored_task = train_task(Job(model, store, engine.template, task_config), args.task)
        task_seconds = time.perf_counter() - t0
        print(f"task adapter: {task_seconds:.0f}s", flush=True)
        done = train_users(
            Job(model, store, engine.template, user_config), sorted(task.users), task=args.task
        )
        print(f"user adapters: {time.perf_counter() - started:.0f}s", flush=True)
        # the lora mode's own host: generation looks the users' adapters up through it
        (lora,) = [m for m in engine.modes if isinstance(m, LoraMode)]
        host = lora.host(model)
        host.capacity = max(host.capacity, len(done) + 1)
        names = {d.user: host.load(d.stored.folder) for d in done}
        scorer = RowScorer(Scorer(model, engine, host), task, names, host.load(stored_task.folder))
        through_seconds = {}
        if args.through_adapter:
            settings = extraction.settings
            if not isinstance(settings, TrainedConfig):
                raise SystemExit("--through-adapter trains the trained method's vectors")
            through_seconds = train_through(scorer, settings.training("user"))
            print(f"vectors through the adapters: {time.perf_counter() - started:.0f}s")
        options = {k: v for k, v in vars(args).items() if k not in ("out", "plot_only")}
        result: dict[str, Any] = {
            "command": "benchmarks/lora_headlines.py "
            + " ".join(
                f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                for k, v in options.items()
                if v is not None and v is not False
            )
            + f" --out {args.out}",
            "task": args.task,
            "model": model.name,
            "authors": len(task.users),
            "queries": len(task.queries("test")),
            "max_new_tokens": args.max_new_tokens,
            "extraction": extraction.to_dict(),
            "task_config": task_config.to_dict(),
            "user_config": user_config.to_dict(),
            "task_train_seconds": task_seconds,
            "task_items": stored_task.meta.items,
        }
        for split in ("validation", "test"):
            scored = score_split(scorer, task, split)
            result[split] = summary(scored["users"], scored["rows"], lower_better=True)
            result[split]["per_query"] = scored
        print(f"NLL: {time.perf_counter() - started:.0f}s", flush=True)
        if args.generate:
            result["generation"] = generate(scorer, task, args)
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
                **({"through_seconds": through_seconds[d.user]} if through_seconds else {}),
            }
        result["per_user"] = per_user
        store.close()
    result["seconds"] = time.perf_counter() - started
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    (args.out / "report.md").write_text(markdown(result))
    plot(result, args.out / "nll.png", title(result, args.task))
    print(markdown(result))
    medians = {
        k: float(np.median([u[k] for u in per_user.values()]))
        for k in next(iter(per_user.values()))
    }
    print(json.dumps({"median_per_user": medians, "seconds": result["seconds"]}, indent=1))


def title(result: dict[str, Any], task: str) -> str:
    users = "moods" if task == "persona" else "authors"
    return (
        f"{task.capitalize()}, {result.get('model', 'smollm2')}, {result['authors']} {users}, "
        f"{result['queries']} test queries; 95% CIs resample users"
    )


if __name__ == "__main__":
    main()
