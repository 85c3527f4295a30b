"""Decoding speed of one mixed batch of 8 users: per-user LoRA adapters vs per-user
steering vs both vs plain, same prompts, same load (SmolLM2, greedy, every row decodes
``--tokens`` new tokens). Each user has a headline author's history: a steering
dictionary (``Personalizer.add_history``) and an adapter (``fints.adapters.jobs``, one
short epoch: speed does not depend on what was learned). The four settings are timed
interleaved, ``--repeats`` times each, after one warm-up; the median is reported.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lora_speed.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fints.adapters.config import LoraTrainConfig
from fints.adapters.jobs import Job, train_users
from fints.benchmark.tasks import SplitConfig, load_headlines
from fints.engine import GenerationRequest, Personalizer
from fints.generation import GenerationOptions
from fints.models import load_model
from fints.prompts import get_template
from fints.steering import SteeringConfig
from fints.store import Store

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "news_headlines.jsonl"
SETTINGS = {
    "plain": {"adapter": False, "steering": SteeringConfig(enabled=False)},
    "steering": {"adapter": False},
    "LoRA": {"adapter": True, "steering": SteeringConfig(enabled=False)},
    "LoRA + steering": {"adapter": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lora-speed"))
    args = parser.parse_args()
    model = load_model()
    task = load_headlines(args.data, SplitConfig(min_items=20, n_test=1, n_val=0, max_history=6))
    users = sorted(task.users)[: args.users]
    options = GenerationOptions(max_new_tokens=args.tokens, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store.sqlite")
        engine = Personalizer(model, store, template="headline")
        for user in users:
            engine.add_history(user, task.users[user].history)
        job = Job(model, store, get_template("headline"), LoraTrainConfig(epochs=1, lr=1e-3))
        train_users(job, users)
        batches = {
            name: [
                GenerationRequest(u, task.users[u].test[0].input, **kwargs)  # type: ignore[arg-type]
                for u in users
            ]
            for name, kwargs in SETTINGS.items()
        }
        for batch in batches.values():  # warm-up (and loads the adapters)
            engine.generate(batch, GenerationOptions(max_new_tokens=2, ignore_eos=True))
        seconds: dict[str, list[float]] = {name: [] for name in SETTINGS}
        for _ in range(args.repeats):
            for name, batch in batches.items():
                start = time.perf_counter()
                results = engine.generate(batch, options)
                seconds[name].append(time.perf_counter() - start)
                assert all(r.completion_tokens == args.tokens for r in results)
        store.close()
    tokens = args.users * args.tokens
    report = {
        "command": f"benchmarks/lora_speed.py --users {args.users} --tokens {args.tokens} "
        f"--repeats {args.repeats}",
        "threads": torch.get_num_threads(),
        "tokens_per_batch": tokens,
        "seconds": seconds,
        "tokens_per_second": {n: tokens / statistics.median(s) for n, s in seconds.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report["tokens_per_second"], indent=1))


if __name__ == "__main__":
    main()
