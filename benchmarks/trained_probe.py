"""Probe: do trained "shared + per-user delta" steering vectors carry the user's signal?

Headlines (``short_description`` -> ``headline``), SmolLM2, bare prompt (no examples).
Per author (>= 20 articles, sorted by date): the last ``--test`` items are test queries;
the ``--history`` items before them are the history, whose latest quarter is held out
for early stopping. ``v_shared`` is trained on all authors' history; each author's
delta starts from it (L2 penalty on the delta, early stopping on the author's own
held-out history). The metric is the per-token NLL of the gold test headline
(teacher-forced, ``<|im_end|>`` included), per row:

* none, shared, own = shared + own delta, wrong-user delta (shared + another author's
  delta), random delta (shared + a random direction of the own delta's norm), own from
  zero (a vector trained on the author's history alone), and shared + the mean of the
  other authors' deltas (not pre-registered).

Paired differences get 95% bootstrap intervals resampling users (not queries) and
sign-flip p-values over users; the three pre-registered comparisons (own vs wrong-user
delta, own vs shared, own vs none) are Holm-corrected. Trained vectors are cached
under ``--cache`` (``OUT/cache``) so a rerun resumes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/trained_probe.py --authors 16
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/trained_probe.py --cost-only
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fints.benchmark.tasks import SplitConfig, file_sha256, headline_records, read_jsonl, time_split
from fints.models import LoadedModel, load_model
from fints.prompts import TEMPLATES, build_prompt_ids
from fints.sites import Site, parse_sites
from fints.target_nll import Example, target_nll
from fints.vector_training import (
    TrainedVectors,
    TrainingConfig,
    holdout_latest,
    train_vectors,
    training_cost_ratio,
)

DATA = Path("/work/shared/data/news_headlines.jsonl")
OUT = Path("benchmarks/results/trained-probe")
PRE_REGISTERED = ("wrong-user delta", "shared", "none")


@dataclass
class Author:
    name: str
    train: list[Example]  # history minus its latest quarter
    valid: list[Example]  # the latest quarter of the history (early stopping)
    test: list[Example]


def load_authors(model: LoadedModel, args: argparse.Namespace) -> list[Author]:
    records = headline_records(read_jsonl(args.data), str(args.data))
    split = SplitConfig(
        min_items=20,
        n_test=args.test,
        n_val=0,
        max_history=args.history,
        max_users=args.authors,
        seed=0,
    )
    tok, template = model.tokenizer, TEMPLATES["headline"]

    def encode(article: str, headline: str) -> Example:
        prompt = build_prompt_ids(tok, template, article)
        target = list(tok(headline, add_special_tokens=False)["input_ids"])
        return prompt, [*target, tok.eos_token_id]

    authors = []
    for name, user in sorted(time_split(records, split).items()):
        history = [encode(i.input, i.output) for i in user.history]
        train, valid = holdout_latest(history, args.valid_fraction)
        test = [encode(q.input, q.reference) for q in user.test]
        authors.append(Author(name, train, valid, test))
    return authors


def cache_key(model: LoadedModel, args: argparse.Namespace, *parts: Any) -> str:
    payload = json.dumps(
        [
            model.fingerprint,
            file_sha256(args.data),
            args.authors,
            args.history,
            args.test,
            args.valid_fraction,
            *parts,
        ],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cached_training(path: Path, train: Any) -> TrainedVectors:
    if path.is_file():
        data = torch.load(path)
        return TrainedVectors(
            sites=tuple(Site.parse(s) for s in data["sites"]),
            values=data["values"],
            train_losses=tuple(data["train_losses"]),
            valid_losses=tuple(data["valid_losses"]),
            best_step=data["best_step"],
            steps_run=data["steps_run"],
            config=TrainingConfig.from_dict(data["config"]),
        )
    result: TrainedVectors = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "sites": [str(s) for s in result.sites],
            "values": result.values,
            "train_losses": list(result.train_losses),
            "valid_losses": list(result.valid_losses),
            "best_step": result.best_step,
            "steps_run": result.steps_run,
            "config": result.config.to_dict(),
        },
        tmp,
    )
    tmp.rename(path)
    return result


def configs(args: argparse.Namespace) -> dict[str, TrainingConfig]:
    return {
        "shared": TrainingConfig(
            steps=args.shared_steps, lr=args.shared_lr, l2=0.0, batch_size=32, patience=5
        ),
        "delta": TrainingConfig(
            steps=args.steps,
            lr=args.lr,
            l2=args.l2,
            patience=3,
            valid_fraction=args.valid_fraction,
        ),
        "zero": TrainingConfig(steps=12, lr=0.1, l2=0.0, patience=3),
    }


def train_all(
    model: LoadedModel, authors: list[Author], sites: tuple[Site, ...], args: argparse.Namespace
) -> tuple[TrainedVectors, dict[str, TrainedVectors], dict[str, TrainedVectors]]:
    cfg = configs(args)
    root = args.cache
    key = cache_key(model, args, [str(s) for s in sites], cfg["shared"].to_dict())
    start = time.perf_counter()
    shared = cached_training(
        root / f"shared-{key}.pt",
        lambda: train_vectors(
            model,
            sites,
            [e for a in authors for e in a.train],
            config=cfg["shared"],
            valid=[a.valid[0] for a in authors],
            progress=True,
        ),
    )
    print(
        f"shared: best step {shared.best_step}/{shared.steps_run}, norm "
        f"{shared.values.norm():.1f}, {time.perf_counter() - start:.0f}s",
        flush=True,
    )
    deltas, zeros = {}, {}
    dkey = cache_key(model, args, key, cfg["delta"].to_dict())
    zkey = cache_key(model, args, [str(s) for s in sites], cfg["zero"].to_dict())
    for n, a in enumerate(authors):
        tag = hashlib.sha256(a.name.encode()).hexdigest()[:10]
        deltas[a.name] = cached_training(
            root / f"delta-{dkey}-{tag}.pt",
            lambda a=a: train_vectors(
                model, sites, a.train, init=shared.values, config=cfg["delta"], valid=a.valid
            ),
        )
        zeros[a.name] = cached_training(
            root / f"zero-{zkey}-{tag}.pt",
            lambda a=a: train_vectors(model, sites, a.train, config=cfg["zero"], valid=a.valid),
        )
        d = deltas[a.name]
        print(
            f"[{n + 1}/{len(authors)}] {a.name}: delta step {d.best_step}/{d.steps_run} "
            f"norm {(d.values - shared.values).norm():.2f}; zero step "
            f"{zeros[a.name].best_step} norm {zeros[a.name].values.norm():.1f}; "
            f"{time.perf_counter() - start:.0f}s",
            flush=True,
        )
    return shared, deltas, zeros


def row_vectors(
    authors: list[Author],
    shared: TrainedVectors,
    deltas: dict[str, TrainedVectors],
    zeros: dict[str, TrainedVectors],
    seed: int,
) -> dict[str, list[torch.Tensor | None]]:
    """Per row, the ``[sites, hidden]`` vector used for each author (None: unsteered)."""
    names = [a.name for a in authors]
    delta = {n: deltas[n].values - shared.values for n in names}
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(len(names)))
    wrong = {names[order[i]]: names[order[(i + 1) % len(names)]] for i in range(len(names))}
    g = torch.Generator().manual_seed(seed)
    rows: dict[str, list[torch.Tensor | None]] = {
        k: []
        for k in (
            "none",
            "shared",
            "own",
            "wrong-user delta",
            "random delta",
            "own from zero",
            "shared + mean other deltas",
        )
    }
    for n in names:
        direction = torch.randn(delta[n].shape, generator=g)
        scale = delta[n].norm(dim=1, keepdim=True) / direction.norm(dim=1, keepdim=True)
        others = torch.stack([delta[m] for m in names if m != n]).mean(0)
        rows["none"].append(None)
        rows["shared"].append(shared.values)
        rows["own"].append(shared.values + delta[n])
        rows["wrong-user delta"].append(shared.values + delta[wrong[n]])
        rows["random delta"].append(shared.values + direction * scale)
        rows["own from zero"].append(zeros[n].values)
        rows["shared + mean other deltas"].append(shared.values + others)
    return rows


def evaluate(
    model: LoadedModel,
    authors: list[Author],
    sites: tuple[Site, ...],
    rows: dict[str, list[torch.Tensor | None]],
) -> dict[str, np.ndarray]:
    """Per row, ``[authors, test queries]`` NLLs."""
    prompts = [p for a in authors for p, _ in a.test]
    targets = [t for a in authors for _, t in a.test]
    counts = [len(a.test) for a in authors]
    out = {}
    for label, per_author in rows.items():
        vectors = None
        if per_author[0] is not None:
            present = [v for v in per_author if v is not None]
            # [queries, sites, hidden]
            stacked = torch.cat(
                [v.unsqueeze(0).expand(c, -1, -1) for v, c in zip(present, counts, strict=True)]
            )
            vectors = {s: stacked[:, i] for i, s in enumerate(sites)}
        nll = target_nll(model, prompts, targets, vectors, batch_size=8).numpy()
        out[label] = nll.reshape(len(authors), -1)
        print(f"{label}: {out[label].mean():.4f}", flush=True)
    return out


def cluster_stats(diff: np.ndarray, seed: int, draws: int = 10000) -> dict[str, float]:
    """``diff [users, queries]``: mean, 95% bootstrap interval over users, sign-flip p."""
    per_user = diff.mean(axis=1)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(per_user), size=(draws, len(per_user)))
    boot = per_user[picks].mean(axis=1)
    observed = abs(per_user.mean())
    if len(per_user) <= 16:
        signs = np.array(list(itertools.product([1.0, -1.0], repeat=len(per_user))))
    else:
        signs = rng.choice([1.0, -1.0], size=(2**16, len(per_user)))
    flipped = np.abs((signs * per_user).mean(axis=1))
    return {
        "mean": float(per_user.mean()),
        "lo": float(np.percentile(boot, 2.5)),
        "hi": float(np.percentile(boot, 97.5)),
        "p": float((flipped >= observed - 1e-12).mean()),
        "users_better": int((per_user < 0).sum()),
    }


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    ordered = sorted(pvalues, key=pvalues.__getitem__)
    adjusted, running = {}, 0.0
    for i, name in enumerate(ordered):
        running = max(running, min(1.0, (len(ordered) - i) * pvalues[name]))
        adjusted[name] = running
    return adjusted


def report(
    scores: dict[str, np.ndarray], args: argparse.Namespace, extra: dict[str, Any]
) -> dict[str, Any]:
    own = scores["own"]
    comparisons = {
        other: cluster_stats(own - scores[other], seed=i)
        for i, other in enumerate(k for k in scores if k != "own")
    }
    adjusted = holm({k: comparisons[k]["p"] for k in PRE_REGISTERED})
    for k, p in adjusted.items():
        comparisons[k]["p_holm"] = p
    return {
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "args": {k: str(v) for k, v in vars(args).items()},
        "users": int(own.shape[0]),
        "queries": int(own.size),
        "mean_nll": {k: float(v.mean()) for k, v in scores.items()},
        "own_minus": comparisons,
        **extra,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Trained steering vectors: shared + per-user delta (headlines, SmolLM2)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"{result['users']} authors, {result['queries']} test headlines; settings: "
        f"{json.dumps(result['settings'])}",
        "",
        "| row | mean NLL (nats/token) |",
        "|---|---|",
        *[f"| {k} | {v:.4f} |" for k, v in result["mean_nll"].items()],
        "",
        "Own minus each row (negative = own is better); 95% bootstrap interval resampling "
        "users; p: sign-flip test over users; Holm over the three pre-registered rows.",
        "",
        "| own minus | diff | 95% CI | users own better | p | p (Holm) |",
        "|---|---|---|---|---|---|",
    ]
    for k, c in result["own_minus"].items():
        holm_p = f"{c['p_holm']:.4f}" if "p_holm" in c else "-"
        lines.append(
            f"| {k} | {c['mean']:+.4f} | [{c['lo']:+.4f}, {c['hi']:+.4f}] | "
            f"{c['users_better']}/{result['users']} | {c['p']:.4f} | {holm_p} |"
        )
    lines += ["", "Training:", "", *[f"- {line}" for line in result["training"]], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--cache", type=Path, default=OUT / "cache")
    parser.add_argument("--authors", type=int, default=16)
    parser.add_argument("--history", type=int, default=16)
    parser.add_argument("--test", type=int, default=4)
    parser.add_argument("--valid-fraction", type=float, default=0.25)
    parser.add_argument("--sites", default="15.block")
    parser.add_argument("--shared-steps", type=int, default=40)
    parser.add_argument("--shared-lr", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--l2", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cost-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model()
    sites = parse_sites(args.sites)
    authors = load_authors(model, args)
    if args.cost_only:
        a = max(authors, key=lambda a: len(a.train) + len(a.valid))
        ratio = training_cost_ratio(model, sites, a.train + a.valid, config=configs(args)["delta"])
        print(json.dumps(ratio, indent=2))
        return
    start = time.perf_counter()
    shared, deltas, zeros = train_all(model, authors, sites, args)
    scores = evaluate(model, authors, sites, row_vectors(authors, shared, deltas, zeros, 0))
    delta_norms = [float((d.values - shared.values).norm()) for d in deltas.values()]
    training = [
        f"shared: {shared.config.to_dict()}, best step {shared.best_step} of "
        f"{shared.steps_run}, norm {shared.values.norm():.1f}",
        f"delta: {configs(args)['delta'].to_dict()}; best steps "
        f"{sorted(d.best_step for d in deltas.values())}; delta norm median "
        f"{np.median(delta_norms):.2f} (range {min(delta_norms):.2f}-{max(delta_norms):.2f})",
        f"own from zero: {configs(args)['zero'].to_dict()}; best steps "
        f"{sorted(z.best_step for z in zeros.values())}; norm median "
        f"{np.median([float(z.values.norm()) for z in zeros.values()]):.1f}",
        f"wall time {time.perf_counter() - start:.0f}s on {args.threads} thread(s) "
        "(cached vectors are not retrained)",
    ]
    result = report(scores, args, {"settings": {"sites": args.sites}, "training": training})
    result["per_user_nll"] = {k: v.mean(axis=1).tolist() for k, v in scores.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
