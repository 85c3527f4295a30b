"""Sweep: which per-user delta settings make trained vectors carry the user?

Headlines, SmolLM2, bare prompt, the split of ``trained_probe.py`` but with every author
that qualifies. Authors are split once (seeded) into *dev* authors, on whose test
headlines the settings are chosen, and *eval* authors, never looked at here (the final
comparison runs on them with ``trained_probe.py --authors-from``... see BENCHMARKS.md).

One shared vector is trained on all authors' history (tenant level, as the method does).
Per setting (lr, l2, sites fixed), each dev author's delta is trained without early
stopping for ``--max-steps`` and its vectors are kept after every update, so one run
gives every stopping point: fixed step counts and the early-stopping rule (best step on
the author's own latest history items, given a patience). For each stopping point the
own vector (shared + own delta) is compared with the wrong-user delta (shared + another
dev author's delta at the same point) and with the shared vector alone, on per-token NLL
of the gold test headlines, with 95% intervals resampling authors.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/trained_sweep.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from trained_probe import (
    Author,
    add_vector_arguments,
    cache_key,
    cached_training,
    load_authors,
    probe_sites,
    shared_config,
    split_authors,
)
from trained_report import cluster_stats

from fints.models import LoadedModel, load_model
from fints.sites import Site
from fints.target_nll import target_nll
from fints.vector_training import TrainedVectors, TrainingConfig, train_vectors

OUT = Path("benchmarks/results/trained-sweep")


@dataclass(frozen=True)
class Trajectory:
    """Vectors after every update (``[steps + 1, sites, hidden]``, step 0 = init) and
    the validation loss after each (on the author's latest history items)."""

    values: torch.Tensor
    valid: list[float]


def trajectory(
    model: LoadedModel,
    sites: tuple[Site, ...],
    author: Author,
    init: torch.Tensor,
    config: TrainingConfig,
    path: Path,
) -> Trajectory:
    if path.is_file():
        cached = torch.load(path)
        return Trajectory(cached["values"], list(cached["valid"]))
    snaps = [init.clone()]
    result = train_vectors(
        model,
        sites,
        author.train,
        init=init,
        config=config,
        valid=author.valid,
        on_step=lambda _step, values: snaps.append(values),
    )
    data = Trajectory(torch.stack(snaps), list(result.valid_losses))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"values": data.values, "valid": data.valid}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").rename(path)
    return data


def early_stop(valid: list[float], patience: int) -> int:
    best, stale = 0, 0
    for step in range(1, len(valid)):
        if valid[step] < valid[best]:
            best, stale = step, 0
        else:
            stale += 1
            if stale >= patience:
                break
    return best


def nll_rows(
    model: LoadedModel,
    authors: list[Author],
    sites: tuple[Site, ...],
    per_author: list[torch.Tensor] | None,
) -> np.ndarray:
    prompts = [p for a in authors for p, _ in a.test]
    targets = [t for a in authors for _, t in a.test]
    vectors = None
    if per_author is not None:
        stacked = torch.cat(
            [
                v.unsqueeze(0).expand(len(a.test), -1, -1)
                for v, a in zip(per_author, authors, strict=True)
            ]
        )
        vectors = {s: stacked[:, i] for i, s in enumerate(sites)}
    nll = target_nll(model, prompts, targets, vectors, batch_size=8).numpy()
    return nll.reshape(len(authors), -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_vector_arguments(parser, delta=False, authors=64, dev=15, shared_steps=80)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--cache", type=Path, default=OUT / "cache")
    parser.add_argument("--grid", default="0.05:0.001,0.1:0.0,0.02:0.0")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--points", default="3,5,10,20,30")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model()
    sites = probe_sites(model, args)
    authors = load_authors(model, args)
    dev, _ = split_authors(authors, args.dev, seed=0)
    print(f"{len(authors)} authors, {len(dev)} dev: {[a.name for a in dev]}", flush=True)
    start = time.perf_counter()
    shared_cfg = shared_config(args)
    key = cache_key(model, args, [str(s) for s in sites], shared_cfg.to_dict())
    shared: TrainedVectors = cached_training(
        args.cache / f"shared-{key}.pt",
        lambda: train_vectors(
            model,
            sites,
            [e for a in authors for e in a.train],
            config=shared_cfg,
            valid=[a.valid[0] for a in authors],
            progress=True,
        ),
    )
    print(
        f"shared: best {shared.best_step}/{shared.steps_run} valid {shared.valid_losses[:1]} -> "
        f"{min(shared.valid_losses):.4f}, norm {shared.values.norm():.1f}, "
        f"{time.perf_counter() - start:.0f}s",
        flush=True,
    )
    names = [a.name for a in dev]
    wrong = {names[i]: names[(i + 1) % len(names)] for i in range(len(names))}
    none = nll_rows(model, dev, sites, None)
    base = nll_rows(model, dev, sites, [shared.values] * len(dev))
    settings: dict[str, Any] = {}
    results: dict[str, Any] = {
        "shared_minus_none": cluster_stats(base - none, seed=0),
        "shared": {
            "best_step": shared.best_step,
            "steps_run": shared.steps_run,
            "norm": float(shared.values.norm()),
        },
        "settings": settings,
    }
    print(f"none {none.mean():.4f} shared {base.mean():.4f}", flush=True)
    points = [int(p) for p in args.points.split(",")]
    for entry in args.grid.split(","):
        lr, l2 = (float(x) for x in entry.split(":"))
        cfg = TrainingConfig(
            steps=args.max_steps,
            lr=lr,
            l2=l2,
            patience=None,
            max_target_tokens=args.max_target_tokens,
        )
        dkey = cache_key(model, args, key, cfg.to_dict())
        trajs = {}
        for n, a in enumerate(dev):
            tag = hashlib.sha256(a.name.encode()).hexdigest()[:10]
            trajs[a.name] = trajectory(
                model, sites, a, shared.values, cfg, args.cache / f"traj-{dkey}-{tag}.pt"
            )
            print(
                f"  lr {lr} l2 {l2} [{n + 1}/{len(dev)}] {time.perf_counter() - start:.0f}s",
                flush=True,
            )
        stops: dict[str, dict[str, int]] = {f"step {p}": {a: p for a in names} for p in points}
        for patience in (3, 5, 10):
            stops[f"early (patience {patience})"] = {
                a: early_stop(trajs[a].valid, patience) for a in names
            }
        out: dict[str, dict[str, Any]] = {}
        for label, at in stops.items():
            own = [trajs[a].values[at[a]] for a in names]
            wrong_v = [trajs[wrong[a]].values[at[wrong[a]]] for a in names]
            s_own = nll_rows(model, dev, sites, own)
            s_wrong = nll_rows(model, dev, sites, wrong_v)
            norms = [float((v - shared.values).norm()) for v in own]
            out[label] = {
                "own": float(s_own.mean()),
                "own_minus_wrong": cluster_stats(s_own - s_wrong, seed=1),
                "own_minus_shared": cluster_stats(s_own - base, seed=2),
                "delta_norm_median": float(np.median(norms)),
                "steps": sorted(at.values()),
            }
            w, s = out[label]["own_minus_wrong"], out[label]["own_minus_shared"]
            print(
                f"lr {lr} l2 {l2} {label}: own {s_own.mean():.4f} | -wrong {w['mean']:+.4f} "
                f"[{w['lo']:+.4f},{w['hi']:+.4f}] {w['users_better']}/{len(dev)} | -shared "
                f"{s['mean']:+.4f} [{s['lo']:+.4f},{s['hi']:+.4f}] | norm {np.median(norms):.2f}",
                flush=True,
            )
        settings[f"lr={lr} l2={l2}"] = out
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"sweep-{args.sites}.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
