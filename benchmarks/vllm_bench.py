"""fints on vLLM against plain vLLM and against fints on transformers, ratios from one run.

Two parts, each printing ratios measured in this run on the same load:

* ``engine``: one in-process ``vllm.LLM`` (prefix cache off); 16 prompts x ``--tokens``
  forced new tokens (greedy, EOS ignored), plain vs steered with 16 distinct users'
  vectors (one packed vector set per request), at the trained method's default site
  and at the contrast method's (more sites: the heavier case). Rounds alternate the
  order (ABBA); the median tokens/s of each arm is reported. The same prompts through
  transformers' ``generate`` (fints' own backend, batched) give the engine ratio.
* ``http``: the fints server on each engine (same personalizer, store and users), N
  concurrent clients, each a distinct user, steered chat requests; throughput and
  p50/p99 latency per engine and concurrency.

    python benchmarks/vllm_bench.py --part engine --part http --out benchmarks/results/vllm

On a GPU: ``--model Qwen/Qwen2.5-1.5B-Instruct --device cuda --dtype bfloat16`` (see
``benchmarks/vllm_gpu.sh``, under 8 minutes for both parts).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from fints.engine import Personalizer
from fints.extraction import ExtractionConfig
from fints.generation import GenerationOptions, generate_batch
from fints.models import LoadedModel, load_model
from fints.modes import SteeringAddition
from fints.prompts import TEMPLATES, build_prompt_ids
from fints.sites import Site
from fints.store import Store

QUERIES = [
    f"Tell me about {t}."
    for t in (
        "dogs", "the moon", "a city at night", "winter", "coffee", "trains", "gardens",
        "music", "the ocean", "bread", "mountains", "markets", "rain", "books", "cats", "maps",
    )
]  # fmt: skip


def distinct_vectors(model: LoadedModel, sites: list[Site], users: int) -> SteeringAddition:
    """``users`` rows of random vectors, each row its own user, norm ~0.5 sqrt(hidden)."""
    g = torch.Generator().manual_seed(0)
    scale = 0.5 * model.hidden_size**0.5
    vectors = {}
    for site in sites:
        raw = torch.randn(users, model.hidden_size, generator=g)
        vectors[site] = raw / raw.norm(dim=1, keepdim=True) * scale
    empty = tuple(() for _ in range(users))
    return SteeringAddition(vectors, empty, empty)


def _timed(fn: Callable[[], Any], tokens: int) -> float:
    began = time.perf_counter()
    fn()
    return tokens / (time.perf_counter() - began)


def engine_part(model: LoadedModel, args: argparse.Namespace) -> dict[str, Any]:
    from fints.vllm_engine.backend import VllmBackend, VllmSettings

    # no prefix cache: every arm computes its prefill (steered prompts are salted apart)
    settings = VllmSettings(max_num_seqs=len(QUERIES), extra={"enable_prefix_caching": False})
    backend = VllmBackend(model, settings)
    prompts = [build_prompt_ids(model.tokenizer, TEMPLATES["generic"], q, []) for q in QUERIES]
    options = GenerationOptions(max_new_tokens=args.tokens, ignore_eos=True)
    tokens = len(prompts) * args.tokens
    site_sets = {
        "trained (15.block)": [Site.parse("15.block")],
        "contrast (attn+mlp, 6 layers)": [
            Site.parse(f"{layer}.{c}") for layer in range(10, 22, 2) for c in ("attn", "mlp")
        ],
    }
    arms: dict[str, Callable[[], Any]] = {
        "vllm plain": lambda: backend.decode(prompts, [], options),
        "transformers plain": lambda: generate_batch(model, prompts, options),
    }
    for name, sites in site_sets.items():
        addition = distinct_vectors(model, sites, len(prompts))
        arms[f"vllm steered, {name}"] = partial(backend.decode, prompts, [addition], options)
        arms[f"transformers steered, {name}"] = partial(
            generate_batch, model, prompts, options, decorations=[addition.decoration(model)]
        )
    for fn in arms.values():  # warm up: first-call costs stay out of the figures
        fn()
    rates: dict[str, list[float]] = {name: [] for name in arms}
    order = list(arms)
    for round_ in range(args.rounds):
        for name in order if round_ % 2 == 0 else order[::-1]:
            rates[name].append(_timed(arms[name], tokens))
            print(f"  round {round_}: {name}: {rates[name][-1]:.1f} tokens/s", flush=True)
    median = {name: statistics.median(r) for name, r in rates.items()}
    plain = median["vllm plain"]
    ratios = {
        f"{name} / vllm plain": median[name] / plain for name in median if name != "vllm plain"
    }
    return {"tokens_per_s": median, "all": rates, "ratios": ratios, "tokens": tokens}


def http_part(model: LoadedModel, args: argparse.Namespace) -> dict[str, Any]:
    from fints.serving.app import ServerConfig, create_app
    from fints.serving.inprocess import RunningServer
    from fints.serving.loadreport import Phase
    from fints.serving.loadtest import LoadSpec, run_phase, seed_users

    folder = tempfile.TemporaryDirectory(prefix="fints-vllm-bench-")
    store = Store(Path(folder.name) / "store.sqlite")
    extraction = ExtractionConfig.for_model(model.num_layers, method="context")
    personalizer = Personalizer(model, store, extraction=extraction)
    results: dict[str, Any] = {}
    seeded = False
    for engine in args.engines:
        config = ServerConfig(engine=engine, max_batch_size=16, max_queue=1024)
        config = replace(config, limits=replace(config.limits, max_tokens=max(args.tokens, 128)))
        app = create_app(personalizer, config)
        with RunningServer(app) as server:
            for clients in args.clients:
                spec = LoadSpec(clients=clients, requests=args.requests, max_tokens=args.tokens)
                if not seeded or clients > args.clients[0]:
                    seed_users(server.url, spec)
                seeded = True
                run_phase(server.url, replace(spec, requests=1), Phase.WARM_UP, steered=True)
                phase = run_phase(server.url, spec, Phase.BATCHED_STEERED, steered=True)
                row = {
                    "clients": clients,
                    "requests": phase.ok,
                    "errors": len(phase.errors),
                    "tokens_per_s": phase.tokens_per_s,
                    "requests_per_s": phase.requests_per_s,
                    "p50_s": phase.percentile(0.5),
                    "p99_s": phase.percentile(0.99),
                    "steered": phase.steered,
                }
                results[f"{engine}@{clients}"] = row
                print(f"  {engine}, {clients} clients: {json.dumps(row)}", flush=True)
    ratios = {}
    for clients in args.clients:
        a, b = results.get(f"vllm@{clients}"), results.get(f"transformers@{clients}")
        if a and b:
            ratios[f"{clients} clients: throughput vllm / transformers"] = (
                a["tokens_per_s"] / b["tokens_per_s"]
            )
            ratios[f"{clients} clients: p99 vllm / transformers"] = a["p99_s"] / b["p99_s"]
    store.close()
    folder.cleanup()
    return {"rows": results, "ratios": ratios}


PARTS = {"engine": engine_part, "http": http_part}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", action="append", choices=sorted(PARTS))
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=4, help="http: requests per client")
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--engines", nargs="+", default=["transformers", "vllm"])
    parser.add_argument("--out", default="benchmarks/results/vllm")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    report: dict[str, Any] = {"model": model.name, "dtype": args.dtype, "device": args.device}
    for part in args.part or ["engine"]:
        print(f"== {part}", flush=True)
        report[part] = PARTS[part](model, args)
        for name, ratio in report[part]["ratios"].items():
            print(f"{name}: {ratio:.3f}", flush=True)
    name = "report-" + "-".join(args.part or ["engine"]) + f"-{args.device}.json"
    (Path(args.out) / name).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
