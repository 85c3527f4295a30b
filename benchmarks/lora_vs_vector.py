"""A per-user steering delta against per-user LoRAs of equal and 100x its size (issue 23).

Headlines, SmolLM2, site 15.block, bare prompt: the authors, dev/eval split, prompts,
shared vector and per-user deltas of ``trained_probe.py``'s eval run (taken from its
cache, ``--vector-cache``; see BENCHMARKS.md, "Trained vectors: shared + per-user
delta"). On top of the SAME shared vector (added at 15.block in training and in
evaluation), the per-user part is one of:

* vector delta: the probe's own delta (576 numbers, 4 Adam steps, lr 0.05, full batch);
* LoRA, equal size: PEFT LoRA r=1 (alpha 1, dropout 0) on ``v_proj`` of layer 15 only
  (576 + 192 = 768 parameters);
* LoRA, 100x: PEFT LoRA r=1 on ``q_proj`` and ``v_proj`` of all 30 layers
  (30 x (576 + 576 + 576 + 192) = 57,600 parameters).

Every per-user part is trained on the same data as the delta: the author's history minus
its latest quarter (12 of the 16 history items; the probe's delta never used the other
4 with early stopping off), with the delta's loss (mean over examples of each example's
mean per-token NLL of the gold headline, targets cut to 32 tokens) under the shared
vector. Adam, batch 4, the item order shuffled each epoch (seeded), ``torch.manual_seed``
per author before the adapter is initialized (A: PEFT's default, B: zero, so training
starts at "shared").

LoRA recipes, fixed before the eval authors were looked at:

* fixed: the per-user setting chosen on validation in "Per-user LoRA (OPPU)" (lr 1e-3,
  2 epochs, batch 4);
* dev-chosen (per shape): the lowest mean test NLL of the 12 *dev* authors over lr in
  ``--dev-lrs`` (1e-3, 1e-2, 3e-2, 1e-1) at 2 epochs (``--dev-epochs``; one run of the
  most epochs per lr, scored after each listed epoch), as ``trained_sweep.py`` chose the
  delta's setting (4 epochs was left out to fit the time).

Rows (per-token NLL of each of the 33 eval authors' 4 gold test headlines, teacher-forced,
``<|im_end|>`` included): none, shared, shared + own delta, shared + wrong-user delta,
shared + own LoRA (each shape and recipe), shared + wrong-user LoRA (each shape and
recipe); the wrong user is ``trained_probe.wrong_users(eval names, 0)``, the probe's.

Pre-declared comparisons (Holm over these three; the dev-chosen recipe of each shape):

1. own LoRA-equal minus own delta;
2. own LoRA-100x minus own delta;
3. own LoRA-100x minus wrong-user LoRA-100x.

Everything else (the fixed recipe, against shared, own vs wrong-user delta) is reported
without correction. Differences: mean over authors of each author's mean paired
difference, 95% bootstrap interval resampling authors, sign-flip p over authors, MDE at
80% power (:mod:`fints.benchmark.stats`). Per author: training seconds (one thread),
user parameters, stored bytes (``save_pretrained``'s ``adapter_model.safetensors``; the
delta: 576 float32). Per-author results (JSON) and adapter weights are cached under
``--out``/cache, so a rerun resumes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lora_vs_vector.py
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from trained_probe import (
    EVAL_RUN,
    Author,
    add_vector_arguments,
    cache_key,
    configs,
    load_authors,
    probe_sites,
    split_authors,
    train_all,
    wrong_users,
)
from trained_report import comparison_line

from fints.benchmark.stats import holm, user_bootstrap
from fints.layers import resolve_layout
from fints.models import LoadedModel, load_model
from fints.sites import Site
from fints.target_nll import Example, forward_nll, pack, target_nll
from fints.vector_training import train_vectors

OUT = Path("benchmarks/results/lora-vs-vector")
VECTOR_CACHE = Path("benchmarks/results/trained-sweep/cache")


@dataclasses.dataclass(frozen=True)
class Shape:
    """Where the rank-1 LoRA goes (``layers``: None = every layer)."""

    name: str
    modules: tuple[str, ...]
    layers: tuple[int, ...] | None

    def config(self) -> LoraConfig:
        return LoraConfig(
            r=1,
            lora_alpha=1,
            lora_dropout=0.0,
            bias="none",
            target_modules=list(self.modules),
            layers_to_transform=list(self.layers) if self.layers is not None else None,
        )


@dataclasses.dataclass(frozen=True)
class Recipe:
    lr: float
    epochs: int
    batch_size: int = 4

    @property
    def label(self) -> str:
        return f"lr {self.lr:g}, {self.epochs} epochs"


FIXED = Recipe(lr=1e-3, epochs=2)
PRIMARY = "dev-chosen"


def author_seed(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)


def shared_rows(shared: torch.Tensor, sites: Sequence[Site], n: int) -> dict[Site, torch.Tensor]:
    return {s: shared[i].unsqueeze(0).expand(n, -1) for i, s in enumerate(sites)}


class LoraUser:
    """One PeftModel (a rank-1 adapter named ``default``) over a private copy of the
    model; each author gets a fresh adapter (re-initialized after a seed), trained with
    the shared vector added at its sites."""

    def __init__(
        self, model: LoadedModel, shape: Shape, sites: Sequence[Site], shared: torch.Tensor
    ) -> None:
        work = copy.deepcopy(model.model)
        work.requires_grad_(False)
        self.shape, self.sites, self.shared = shape, tuple(sites), shared
        self.peft = get_peft_model(work, shape.config())  # injects into ``work`` in place
        self.peft.eval()
        self.loaded = dataclasses.replace(model, model=work, layout=resolve_layout(work))
        self.params = [p for p in self.peft.parameters() if p.requires_grad]
        self.count = sum(p.numel() for p in self.params)
        self.shapes = sorted(
            {f"{n.split('.lora_')[1]}: {tuple(p.shape)}" for n, p in self.named_trainable()}
        )

    def named_trainable(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, p) for n, p in self.peft.named_parameters() if p.requires_grad]

    def reset(self, seed: int) -> None:
        torch.manual_seed(seed)
        for module in self.peft.modules():
            if isinstance(module, LoraLayer):
                module.reset_lora_parameters("default", True)

    def train(
        self,
        examples: Sequence[Example],
        recipe: Recipe,
        seed: int,
        max_target_tokens: int,
        after_epoch: Callable[[int], None] | None = None,
    ) -> list[float]:
        """Adam on the adapter only; returns each step's loss. ``after_epoch(e)`` runs
        (not timed by the caller's clock if it subtracts) after every epoch."""
        self.reset(seed)
        optimizer = torch.optim.Adam(self.params, lr=recipe.lr)
        pad = self.loaded.tokenizer.pad_token_id or 0
        order, rng = list(range(len(examples))), random.Random(seed)
        losses = []
        for epoch in range(1, recipe.epochs + 1):
            rng.shuffle(order)
            for at in range(0, len(order), recipe.batch_size):
                chosen = [examples[i] for i in order[at : at + recipe.batch_size]]
                batch = pack(chosen, pad, max_target_tokens=max_target_tokens)
                rows = shared_rows(self.shared, self.sites, batch.size)
                loss = forward_nll(self.loaded, batch, rows).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            if after_epoch is not None:
                after_epoch(epoch)
        return losses

    def nll(self, examples: Sequence[Example]) -> list[float]:
        prompts = [p for p, _ in examples]
        targets = [t for _, t in examples]
        rows = shared_rows(self.shared, self.sites, 1)
        return target_nll(self.loaded, prompts, targets, rows, batch_size=8).tolist()

    def state(self) -> dict[str, torch.Tensor]:
        return {
            k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.peft).items()
        }

    def load(self, state: dict[str, torch.Tensor]) -> None:
        result: Any = set_peft_model_state_dict(self.peft, state)
        if result.unexpected_keys:
            raise RuntimeError(f"adapter does not fit: {result.unexpected_keys[:2]}")

    def stored_bytes(self) -> dict[str, int]:
        with tempfile.TemporaryDirectory() as tmp:
            self.peft.save_pretrained(tmp)
            files = {p.name: p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()}
        return {
            "adapter_model.safetensors": files["adapter_model.safetensors"],
            "all_files": sum(files.values()),
        }


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(data, indent=1))
    path.with_suffix(".tmp").rename(path)


def dev_choice(
    runners: dict[str, LoraUser],
    dev: list[Author],
    args: argparse.Namespace,
    prefix: str,
    start: float,
) -> dict[str, Any]:
    """Per shape: each dev author's test NLL after each epoch in ``--dev-epochs`` of one
    run per lr; the recipe with the lowest mean is chosen."""
    epochs = sorted(int(e) for e in args.dev_epochs.split(","))
    lrs = [float(x) for x in args.dev_lrs.split(",")]
    out: dict[str, Any] = {}
    for shape, runner in runners.items():
        grid: dict[str, dict[str, list[float]]] = {}
        by_label: dict[str, Recipe] = {}
        seconds: list[float] = []
        for lr in lrs:
            recipe = Recipe(lr=lr, epochs=max(epochs))
            for n, a in enumerate(dev):
                key = hashlib.sha256(
                    f"{prefix}|dev|{shape}|{dataclasses.astuple(recipe)}|{epochs}|{a.name}".encode()
                ).hexdigest()[:16]
                path = args.out / "cache" / f"dev-{key}.json"
                cached = read_json(path)
                if cached is None:
                    scored: dict[str, list[float]] = {}
                    held = [0.0]

                    def score(
                        epoch: int,
                        a: Author = a,
                        runner: LoraUser = runner,
                        scored: dict[str, list[float]] = scored,
                        held: list[float] = held,
                    ) -> None:
                        if epoch in epochs:
                            t = time.perf_counter()
                            scored[str(epoch)] = runner.nll(a.test)
                            held[0] += time.perf_counter() - t

                    t0 = time.perf_counter()
                    runner.train(
                        a.train, recipe, author_seed(a.name), args.max_target_tokens, score
                    )
                    cached = {"nll": scored, "seconds": time.perf_counter() - t0 - held[0]}
                    write_json(path, cached)
                seconds.append(cached["seconds"])
                for e, nll in cached["nll"].items():
                    by_label[Recipe(lr, int(e)).label] = Recipe(lr, int(e))
                    grid.setdefault(Recipe(lr, int(e)).label, {})[a.name] = nll
                print(
                    f"dev {shape} lr {lr:g} [{n + 1}/{len(dev)}] {a.name}: "
                    + " ".join(f"e{e} {np.mean(v):.4f}" for e, v in cached["nll"].items())
                    + f" ({cached['seconds']:.0f}s train); {time.perf_counter() - start:.0f}s",
                    flush=True,
                )
        means = {label: float(np.mean(list(v.values()))) for label, v in grid.items()}
        best = min(means, key=lambda k: means[k])
        out[shape] = {
            "mean_test_nll": means,
            "chosen": {"lr": by_label[best].lr, "epochs": by_label[best].epochs},
            "train_seconds_median": float(np.median(seconds)),
            "per_author": grid,
        }
        print(f"dev {shape}: " + ", ".join(f"{k}: {v:.4f}" for k, v in means.items()))
        print(f"dev {shape}: chosen {best}", flush=True)
    return out


def user_stats(a: np.ndarray, b: np.ndarray, seed: int) -> dict[str, Any]:
    """``a``, ``b``: ``[authors, queries]`` NLLs; ``a - b`` summarized over authors."""
    users = [str(u) for u in range(a.shape[0]) for _ in range(a.shape[1])]
    d = user_bootstrap(a.ravel(), b.ravel(), users, resamples=10000, seed=seed)
    return {
        "mean": d.mean,
        "lo": d.lo,
        "hi": d.hi,
        "p": d.p,
        "mde": d.mde,
        "users_a_better": int(((a - b).mean(axis=1) < 0).sum()),
    }


def markdown(result: dict[str, Any]) -> str:
    n = result["authors"]
    lines = [
        "# Per-user vector vs LoRA of equal and 100x size (headlines, SmolLM2)",
        "",
        f"`{result['command']}`",
        "",
        f"{n} eval authors, {result['queries']} test headlines; per-token NLL (nats/token).",
        "",
        "## Dev choice (12 dev authors, mean test NLL)",
        "",
    ]
    for shape, d in result["dev"].items():
        cells = ", ".join(f"{k}: {v:.4f}" for k, v in d["mean_test_nll"].items())
        lines.append(f"- {shape}: {cells}; chosen lr {d['chosen']['lr']:g}, "
                     f"{d['chosen']['epochs']} epochs")  # fmt: skip
    lines += [
        f"- dev: none {result['dev_rows']['none']:.4f}, shared {result['dev_rows']['shared']:.4f}",
        "",
        "## Rows",
        "",
        "| row | mean NLL | minus own delta [95 % CI] | authors better than delta |",
        "|---|---|---|---|",
    ]
    for row, mean in result["mean_nll"].items():
        c = result["vs_delta"].get(row)
        cell = (
            f"{c['mean']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}] | {c['users_a_better']}/{n}"
            if c
            else " | "
        )
        lines.append(f"| {row} | {mean:.4f} | {cell} |")
    lines += [
        "",
        "## Comparisons (a - b, < 0: a better)",
        "",
        "| a - b | diff | 95 % CI | MDE | authors a better | p | p (Holm) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in result["comparisons"].items():
        lines.append(comparison_line(name, c, c["users_a_better"], n))
    lines += [
        "",
        "## Cost per author (medians; one thread)",
        "",
        "| per-user part | parameters | stored bytes (safetensors) | training seconds |",
        "|---|---|---|---|",
    ]
    for name, c in result["cost"].items():
        lines.append(
            f"| {name} | {c['parameters']:,} | {c['bytes']:,} | {c['train_seconds_median']:.1f} |"
        )
    lines += ["", *[f"- {x}" for x in result["notes"]]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--vector-cache", dest="cache", type=Path, default=VECTOR_CACHE)
    parser.add_argument("--eval-authors", type=int, default=0, help="0: all eval authors")
    parser.add_argument("--dev-lrs", default="1e-3,1e-2,3e-2,1e-1")
    parser.add_argument("--dev-epochs", default="2")
    parser.add_argument("--dev-limit", type=int, default=0, help="smoke tests: N dev authors")
    parser.add_argument("--delta-timing", type=int, default=5, help="retrain N deltas, timed")
    parser.add_argument("--time-only", action="store_true", help="time one author and stop")
    parser.add_argument("--threads", type=int, default=1)
    add_vector_arguments(parser, **EVAL_RUN)  # trained_probe.py's measured run: its cache
    args = parser.parse_args()
    args.zero = False
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = load_model()
    sites = probe_sites(model, args)
    authors = load_authors(model, args)
    dev, evaluated = split_authors(authors, args.dev)
    if args.eval_authors:
        evaluated = evaluated[: args.eval_authors]
    if args.dev_limit:
        dev = dev[: args.dev_limit]
    key = cache_key(model, args, [str(s) for s in sites], configs(args)["shared"].to_dict())
    if not (args.cache / f"shared-{key}.pt").is_file():
        sys.exit(f"no cached shared vector {args.cache}/shared-{key}.pt: run trained_probe.py")
    shared_v, deltas, _ = train_all(model, authors, evaluated, sites, args)
    shared = shared_v.values
    layer = sites[0].layer
    shapes = [
        Shape("LoRA equal", ("v_proj",), (layer,)),
        Shape("LoRA 100x", ("q_proj", "v_proj"), None),
    ]
    runners = {s.name: LoraUser(model, s, sites, shared) for s in shapes}
    v_proj = model.model.model.layers[layer].self_attn.v_proj
    q_proj = model.model.model.layers[layer].self_attn.q_proj
    print(f"v_proj {tuple(v_proj.weight.shape)}, q_proj {tuple(q_proj.weight.shape)} (out, in)")
    for name, r in runners.items():
        print(f"{name}: {r.count:,} user parameters; {r.shapes}", flush=True)
    prefix = cache_key(model, args, [str(s) for s in sites], key, "lora-vs-vector")

    if args.time_only:
        a = evaluated[0]
        for name, r in runners.items():
            t0 = time.perf_counter()
            r.train(a.train, Recipe(lr=1e-3, epochs=1), 0, args.max_target_tokens)
            print(f"{name}: 1 epoch ({len(a.train)} items) {time.perf_counter() - t0:.1f}s")
        t0 = time.perf_counter()
        train_vectors(model, sites, a.train, init=shared, config=configs(args)["delta"])
        print(f"delta: {time.perf_counter() - t0:.1f}s", flush=True)
        return

    # sanity: a fresh adapter (B = 0) scores exactly like the shared vector
    probe = evaluated[0]
    base = target_nll(model, [p for p, _ in probe.test], [t for _, t in probe.test],
                      shared_rows(shared, sites, 1)).numpy()  # fmt: skip
    for r in runners.values():
        r.reset(0)
        gap = float(np.abs(np.array(r.nll(probe.test)) - base).max())
        assert gap < 1e-4, f"{r.shape.name}: a fresh adapter changes the NLL by {gap}"

    dev_result = dev_choice(runners, dev, args, prefix, start)
    recipes = {
        name: {
            "fixed": FIXED,
            PRIMARY: Recipe(lr=d["chosen"]["lr"], epochs=d["chosen"]["epochs"]),
        }
        for name, d in dev_result.items()
    }

    # eval authors: train each shape x recipe, score own test headlines, keep the weights
    names = [a.name for a in evaluated]
    own: dict[str, dict[str, list[list[float]]]] = {}
    states: dict[tuple[str, str, str], Path] = {}
    per_author: dict[str, dict[str, Any]] = {n: {} for n in names}
    for i, a in enumerate(evaluated):
        seed = author_seed(a.name)
        for shape, runner in runners.items():
            for tag, recipe in recipes[shape].items():
                key_a = hashlib.sha256(
                    f"{prefix}|eval|{shape}|{dataclasses.astuple(recipe)}|{a.name}".encode()
                ).hexdigest()[:16]
                path = args.out / "cache" / f"eval-{key_a}.json"
                states[(shape, tag, a.name)] = path.with_suffix(".pt")
                cached = read_json(path)
                if cached is None:
                    t0 = time.perf_counter()
                    losses = runner.train(a.train, recipe, seed, args.max_target_tokens)
                    seconds = time.perf_counter() - t0
                    torch.save(runner.state(), path.with_suffix(".pt"))
                    cached = {
                        "nll": runner.nll(a.test),
                        "train_seconds": seconds,
                        "steps": len(losses),
                        "losses": losses,
                        "parameters": runner.count,
                        "bytes": runner.stored_bytes(),
                    }
                    write_json(path, cached)
                own.setdefault(f"{shape} ({tag})", {})[a.name] = cached["nll"]
                per_author[a.name][f"{shape} ({tag})"] = {
                    k: cached[k] for k in ("train_seconds", "steps", "parameters", "bytes")
                }
                per_author[a.name][f"{shape} ({tag})"]["first_last_loss"] = [
                    cached["losses"][0],
                    cached["losses"][-1],
                ]
        print(
            f"[{i + 1}/{len(evaluated)}] {a.name}: "
            + " ".join(
                f"{row} {np.mean(v[a.name]):.4f} ({per_author[a.name][row]['train_seconds']:.0f}s)"
                for row, v in own.items()
            )
            + f"; {time.perf_counter() - start:.0f}s",
            flush=True,
        )

    # delta training time (retrained, checked against the cached delta)
    delta_seconds, delta_gap = [], []
    for a in evaluated[: args.delta_timing]:
        t0 = time.perf_counter()
        again = train_vectors(model, sites, a.train, init=shared, config=configs(args)["delta"])
        delta_seconds.append(time.perf_counter() - t0)
        delta_gap.append(float((again.values - deltas[a.name].values).abs().max()))
    if delta_seconds:
        print(f"delta: {np.median(delta_seconds):.1f}s median, max |retrained - cached| "
              f"{max(delta_gap):.2e}", flush=True)  # fmt: skip

    # the rows
    wrong = wrong_users(names, 0)
    test = [e for a in evaluated for e in a.test]
    prompts, targets = [p for p, _ in test], [t for _, t in test]
    per = len(evaluated[0].test)

    def vector_row(vectors: list[torch.Tensor] | None) -> np.ndarray:
        rows = None
        if vectors is not None:
            stacked = torch.stack([v for v in vectors for _ in range(per)])
            rows = {s: stacked[:, i] for i, s in enumerate(sites)}
        return target_nll(model, prompts, targets, rows, batch_size=8).numpy().reshape(-1, per)

    scores: dict[str, np.ndarray] = {
        "none": vector_row(None),
        "shared": vector_row([shared] * len(names)),
        "shared + own delta": vector_row([deltas[n].values for n in names]),
        "shared + wrong-user delta": vector_row([deltas[wrong[n]].values for n in names]),
    }
    for row, nll in own.items():
        scores[f"shared + own {row}"] = np.array([nll[n] for n in names])
    for shape, runner in runners.items():
        for tag in recipes[shape]:
            nll_w = []
            for a in evaluated:
                runner.load(torch.load(states[(shape, tag, wrong[a.name])]))
                nll_w.append(runner.nll(a.test))
            scores[f"shared + wrong-user {shape} ({tag})"] = np.array(nll_w)
    for row, s in scores.items():
        print(f"{row}: {s.mean():.4f}", flush=True)

    delta_row = "shared + own delta"
    pre = {
        "own LoRA equal - own delta": (f"shared + own LoRA equal ({PRIMARY})", delta_row),
        "own LoRA 100x - own delta": (f"shared + own LoRA 100x ({PRIMARY})", delta_row),
        "own LoRA 100x - wrong-user LoRA 100x": (
            f"shared + own LoRA 100x ({PRIMARY})",
            f"shared + wrong-user LoRA 100x ({PRIMARY})",
        ),
    }
    more = {
        "own LoRA equal (fixed) - own delta": ("shared + own LoRA equal (fixed)", delta_row),
        "own LoRA 100x (fixed) - own delta": ("shared + own LoRA 100x (fixed)", delta_row),
        "own LoRA 100x (fixed) - wrong-user LoRA 100x (fixed)": (
            "shared + own LoRA 100x (fixed)",
            "shared + wrong-user LoRA 100x (fixed)",
        ),
        "own LoRA equal - wrong-user LoRA equal": (
            f"shared + own LoRA equal ({PRIMARY})",
            f"shared + wrong-user LoRA equal ({PRIMARY})",
        ),
        "own delta - wrong-user delta": (delta_row, "shared + wrong-user delta"),
        "own delta - shared": (delta_row, "shared"),
        "own LoRA equal - shared": (f"shared + own LoRA equal ({PRIMARY})", "shared"),
        "own LoRA 100x - shared": (f"shared + own LoRA 100x ({PRIMARY})", "shared"),
        "own LoRA 100x - own LoRA equal": (
            f"shared + own LoRA 100x ({PRIMARY})",
            f"shared + own LoRA equal ({PRIMARY})",
        ),
        "shared - none": ("shared", "none"),
    }
    comparisons = {
        name: user_stats(scores[a], scores[b], seed=i)
        for i, (name, (a, b)) in enumerate({**pre, **more}.items())
    }
    for name, p in holm({k: comparisons[k]["p"] for k in pre}).items():
        comparisons[name]["p_holm"] = p
    vs_delta = {
        row: user_stats(s, scores[delta_row], seed=100 + i)
        for i, (row, s) in enumerate(scores.items())
        if row != delta_row
    }

    cost: dict[str, Any] = {
        "vector delta": {
            "parameters": int(shared.numel()),
            "bytes": int(shared.numel()) * 4,
            "train_seconds_median": float(np.median(delta_seconds)) if delta_seconds else 0.0,
        }
    }
    for row in own:
        parts = [per_author[n][row] for n in names]
        cost[row] = {
            "parameters": parts[0]["parameters"],
            "bytes": parts[0]["bytes"]["adapter_model.safetensors"],
            "bytes_with_config": parts[0]["bytes"]["all_files"],
            "steps": parts[0]["steps"],
            "train_seconds_median": float(np.median([p["train_seconds"] for p in parts])),
        }
    dev_scores = {
        "none": vector_row_for(model, dev, sites, None),
        "shared": vector_row_for(model, dev, sites, shared),
    }
    result: dict[str, Any] = {
        "command": " ".join(shlex.quote(x) for x in sys.argv),
        "args": {k: str(v) for k, v in vars(args).items()},
        "authors": len(names),
        "queries": int(scores["none"].size),
        "recipes": {
            s: {t: dataclasses.asdict(r) for t, r in rs.items()} for s, rs in recipes.items()
        },
        "lora_shapes": {
            n: {"parameters": r.count, "tensors": r.shapes} for n, r in runners.items()
        },
        "dev": dev_result,
        "dev_rows": {k: float(v) for k, v in dev_scores.items()},
        "mean_nll": {k: float(v.mean()) for k, v in scores.items()},
        "vs_delta": vs_delta,
        "comparisons": comparisons,
        "cost": cost,
        "delta_retrained_max_abs_gap": max(delta_gap) if delta_gap else None,
        "per_author": per_author,
        "per_author_nll": {k: v.mean(axis=1).tolist() for k, v in scores.items()},
        "per_query_nll": {k: v.tolist() for k, v in scores.items()},
        "names": names,
        "wrong_user": wrong,
        "notes": [
            f"data per author: {len(evaluated[0].train)} history items (the delta's training "
            "set), batch 4, the loss under the shared vector at "
            f"{args.sites}",
            f"wall time {time.perf_counter() - start:.0f}s on {args.threads} thread(s) "
            "(cached results are not recomputed)",
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "report.md").write_text(markdown(result))
    print(markdown(result))


def vector_row_for(
    model: LoadedModel, authors: list[Author], sites: Sequence[Site], vector: torch.Tensor | None
) -> float:
    """Mean test NLL of ``authors`` with one vector for all (None: unsteered)."""
    prompts = [p for a in authors for p, _ in a.test]
    targets = [t for a in authors for _, t in a.test]
    rows = shared_rows(vector, sites, 1) if vector is not None else None
    return float(target_nll(model, prompts, targets, rows, batch_size=8).mean())


if __name__ == "__main__":
    main()
