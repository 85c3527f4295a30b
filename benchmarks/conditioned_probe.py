"""Probe: a per-user steering part learned across users, ``delta_u = W · e_u``.

Headlines, SmolLM2, site 15.block, bare prompt, the authors, splits and frozen shared
vector of ``trained_probe.py`` (its cache, ``--vector-cache``: nothing is retrained
there). Instead of a free delta per user (which overfits 12 headlines), the delta is a
function of the user's history shared by all users: ``e_u`` is the mean MiniLM
embedding of the user's history headlines (centred on the training authors' mean and
scaled to mean norm 1), ``W = B A`` has rank ``r`` (``A [r, 384]``, ``B [576, r]``,
``B = 0`` at the start, so training starts at the shared vector). W is trained with
Adam on the per-token NLL of history headlines (the authors' 12 training items; never
a test item), each example steered by ``shared + W e`` of its own author, where ``e``
leaves the example's own headline out (at test time the target is never in the
history either); loss + ``--l2`` x the batch's mean ``||W e||^2``. The layers below the
site run once per batch (:func:`fints.target_nll.capture_below`).

Two variants: W trained on all 45 authors' histories ("all"), and on the 12 dev
authors' only ("dev", W never saw an eval author). Rank (``--ranks``) and the stopping
step (``--checkpoints``) are chosen per variant on the dev authors' test NLL (lowest
own conditioned NLL); the chosen W is measured once on the eval authors' test
headlines: none, shared, own delta (``trained_probe``'s cached delta), own conditioned
(``shared + W e_own``), wrong-user conditioned (``shared + W e_other``, the fixed
derangement :func:`trained_probe.wrong_users`). Pre-registered, per variant: own
conditioned vs shared and vs wrong-user conditioned; Holm over the four.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/conditioned_probe.py
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trained_probe as tp
from trained_report import cluster_stats, comparison_line

from fints.benchmark.stats import holm
from fints.encoders import SentenceTransformerEncoder
from fints.models import LoadedModel, load_model
from fints.sites import Site
from fints.target_nll import capture_below, pack, upper_nll

OUT = Path("benchmarks/results/conditioned-probe")
VECTORS = Path("benchmarks/results/trained-sweep/cache")


def embeddings(
    authors: list[tp.Author],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per author: the mean embedding of the whole history's outputs ``[384]`` (used at
    test time) and, per training item, the mean over the other history items ``[n, 384]``
    (the training items are the history's oldest, in order)."""
    encoder = SentenceTransformerEncoder()
    full, loo = {}, {}
    for a in authors:
        emb = encoder.encode([h.output for h in a.history]).float()
        n = emb.shape[0]
        full[a.name] = emb.mean(0)
        loo[a.name] = (emb.sum(0, keepdim=True) - emb[: len(a.train)]) / (n - 1)
    return full, loo


class Conditioner(torch.nn.Module):
    """``delta = B A (e - mu) / scale``; ``mu`` and ``scale`` from the training authors."""

    def __init__(self, rank: int, dim: int, hidden: int, mu: torch.Tensor, scale: float, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(dim, rank, generator=g))
        self.A = torch.nn.Parameter(q.T * (dim / rank) ** 0.5)  # |A z| ~ |z| for random z
        self.B = torch.nn.Parameter(torch.zeros(hidden, rank))
        self.mu: torch.Tensor
        self.register_buffer("mu", mu.clone())
        self.scale = scale

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return ((e - self.mu) / self.scale) @ self.A.T @ self.B.T


def train_conditioner(
    model: LoadedModel,
    site: Site,
    train_authors: list[tp.Author],
    shared: torch.Tensor,
    full: dict[str, torch.Tensor],
    loo: dict[str, torch.Tensor],
    rank: int,
    args: argparse.Namespace,
) -> dict[int, dict[str, Any]]:
    """Adam on W; the state (and the mean train NLL so far) at each checkpoint step."""
    centres = torch.stack([full[a.name] for a in train_authors])
    mu = centres.mean(0)
    scale = float((centres - mu).norm(dim=1).mean())
    net = Conditioner(rank, mu.numel(), model.hidden_size, mu, scale, args.seed)
    examples = [(ex, loo[a.name][i]) for a in train_authors for i, ex in enumerate(a.train)]
    random.Random(args.seed).shuffle(examples)
    pad_id = model.tokenizer.pad_token_id or 0
    batches = []
    with torch.no_grad():
        for s in range(0, len(examples), args.batch_size):
            chunk = examples[s : s + args.batch_size]
            piece = pack([ex for ex, _ in chunk], pad_id, max_target_tokens=args.max_target_tokens)
            state = capture_below(model, piece, site.layer)
            batches.append((piece, state, torch.stack([e for _, e in chunk])))
    optimizer = torch.optim.Adam(net.parameters(), lr=args.w_lr)
    rng, losses = random.Random(args.seed + 1), []
    order: list[int] = []
    out, start = {}, time.perf_counter()
    for step in range(1, max(args.checkpoints) + 1):
        if not order:
            order = list(range(len(batches)))
            rng.shuffle(order)
        piece, state, e = batches[order.pop()]
        delta = net(e)
        vectors = {site: (shared + delta).to(model.device)}
        nll = upper_nll(model, piece, state, vectors)
        loss = nll.mean() + args.l2 * delta.pow(2).sum(1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(nll.detach().mean()))
        if step in args.checkpoints:
            out[step] = {
                "state": {k: v.detach().clone() for k, v in net.state_dict().items()},
                "scale": scale,
                "train_nll": float(np.mean(losses[-len(batches) :])),
            }
            print(
                f"  rank {rank} step {step}: train NLL (last epoch) {out[step]['train_nll']:.4f}, "
                f"{time.perf_counter() - start:.0f}s",
                flush=True,
            )
    return out


def load_net(saved: dict[str, Any], rank: int, hidden: int) -> Conditioner:
    mu = saved["state"]["mu"]
    net = Conditioner(rank, mu.numel(), hidden, mu, saved["scale"], 0)
    net.load_state_dict(saved["state"])
    return net


def conditioned_rows(
    net: Conditioner,
    authors: list[tp.Author],
    shared: torch.Tensor,
    full: dict[str, torch.Tensor],
    label: str,
    wrong: dict[str, str] | None = None,
) -> dict[str, dict[str, tp.Row]]:
    """``tp.evaluate``'s rows: own conditioned (and, given ``wrong``, wrong-user)."""
    rows: dict[str, dict[str, tp.Row]] = {}
    with torch.no_grad():
        for a in authors:
            prompts = [list(p) for p, _ in a.test]
            sources = {label: a.name} | ({f"{label} wrong user": wrong[a.name]} if wrong else {})
            for row, source in sources.items():
                v = shared + net(full[source].unsqueeze(0))
                rows.setdefault(row, {})[a.name] = (prompts, [v] * len(prompts))
    return rows


def fixed_rows(authors: list[tp.Author], vector: Any) -> dict[str, tp.Row]:
    """Per author: the bare test prompts, each with ``vector(author)``."""
    return {a.name: ([list(p) for p, _ in a.test], [vector(a)] * len(a.test)) for a in authors}


def norms(net: Conditioner, authors: list[tp.Author], full: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(net(torch.stack([full[a.name] for a in authors])).norm(dim=1).median())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # trained_probe's measured run: its settings name its cached vectors
    tp.add_vector_arguments(parser, delta_l2="--l2-delta", **tp.EVAL_RUN)
    parser.add_argument("--vector-cache", type=Path, default=VECTORS)
    # W
    parser.add_argument("--ranks", default="4,16")
    parser.add_argument("--checkpoints", default="25,50,100", help="stopping steps tried (one run)")
    parser.add_argument("--w-lr", type=float, default=1e-2)
    parser.add_argument("--l2", type=float, default=1e-3, help="on the mean ||W e||^2")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--variants", default="all,dev")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--cache", type=Path, default=OUT / "cache")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.checkpoints = sorted(int(s) for s in args.checkpoints.split(","))
    ranks = [int(r) for r in args.ranks.split(",")]
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = load_model()
    model.model.requires_grad_(False)
    model.model.eval()
    sites = tp.probe_sites(model, args)
    (site,) = sites
    authors = tp.load_authors(model, args)
    dev, evaluated = tp.split_authors(authors, args.dev)

    # the shared vector and own deltas, as trained_probe.py cached them (never retrained)
    probe_args = copy.copy(args)
    probe_args.cache, probe_args.l2, probe_args.zero = (
        args.vector_cache, args.l2_delta, False,
    )  # fmt: skip
    key = tp.cache_key(
        model, probe_args, [str(s) for s in sites], tp.shared_config(probe_args).to_dict()
    )
    if not (args.vector_cache / f"shared-{key}.pt").is_file():
        sys.exit(f"no cached shared vector shared-{key}.pt under {args.vector_cache}")
    shared_tv, deltas, _ = tp.train_all(model, authors, evaluated, sites, probe_args)
    shared = shared_tv.values  # [1, hidden]
    full, loo = embeddings(authors)
    pools = {"all": authors, "dev": dev}
    args.cache.mkdir(parents=True, exist_ok=True)

    base_tag = tp.cache_key(
        model, probe_args, key, "base", tp.configs(probe_args)["delta"].to_dict()
    )
    results: dict[str, Any] = {"selection": {}, "chosen": {}}
    rows = {
        "none": fixed_rows(evaluated, lambda a: None),
        "shared": fixed_rows(evaluated, lambda a: shared),
        "own delta": fixed_rows(evaluated, lambda a: deltas[a.name].values),
    }
    scores = tp.evaluate(model, evaluated, sites, rows, args.cache, base_tag)
    dev_rows = {"shared": fixed_rows(dev, lambda a: shared)}
    dev_base = tp.evaluate(model, dev, sites, dev_rows, args.cache, base_tag + "-dev")["shared"]
    wrong = tp.wrong_users([a.name for a in evaluated], args.seed)
    for variant in args.variants.split(","):
        pool = pools[variant]
        candidates = {}
        for rank in ranks:
            wkey = tp.cache_key(
                model, probe_args, key, variant, rank, args.checkpoints, args.w_lr, args.l2,
                args.batch_size, args.seed, "loo-centred-v1",
            )  # fmt: skip
            path = args.cache / f"w-{wkey}.pt"
            if path.is_file():
                saved = torch.load(path)
            else:
                print(f"training W ({variant}, rank {rank}) on {len(pool)} authors", flush=True)
                saved = train_conditioner(model, site, pool, shared, full, loo, rank, args)
                torch.save(saved, path)
            for step in args.checkpoints:
                net = load_net(saved[step], rank, model.hidden_size)
                label = f"{variant} r{rank} s{step}"
                dev_rows = conditioned_rows(net, dev, shared, full, label)
                nll = tp.evaluate(model, dev, sites, dev_rows, args.cache, wkey)[label]
                c = cluster_stats(nll - dev_base, seed=0)
                candidates[label] = (float(nll.mean()), rank, step, net, wkey)
                results["selection"][label] = {
                    "dev_nll": float(nll.mean()),
                    "minus_shared": [c["mean"], c["lo"], c["hi"]],
                    "train_nll": saved[step]["train_nll"],
                    "delta_norm": norms(net, dev, full),
                }
        label = min(candidates, key=lambda k: candidates[k][0])
        _, rank, step, net, wkey = candidates[label]
        results["chosen"][variant] = {"rank": rank, "step": step, "label": label}
        name = f"own conditioned ({variant})"
        eval_rows = conditioned_rows(net, evaluated, shared, full, name, wrong)
        scores |= tp.evaluate(model, evaluated, sites, eval_rows, args.cache, f"{wkey}-{step}")
        results["chosen"][variant]["eval_delta_norm"] = norms(net, evaluated, full)

    comparisons, pre = {}, {}
    for i, variant in enumerate(args.variants.split(",")):
        own = scores[f"own conditioned ({variant})"]
        for j, other in enumerate(
            ["shared", f"own conditioned ({variant}) wrong user", "own delta", "none"]
        ):
            name = f"own conditioned ({variant}) - {other}"
            comparisons[name] = cluster_stats(own - scores[other], seed=10 * i + j)
            if j < 2:
                pre[name] = comparisons[name]["p"]
    comparisons["own delta - shared"] = cluster_stats(
        scores["own delta"] - scores["shared"], seed=99
    )
    for k, p in holm(pre).items():
        comparisons[k]["p_holm"] = p
    results |= {
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "args": {k: str(v) for k, v in vars(args).items()},
        "users": len(evaluated),
        "queries": int(scores["none"].size),
        "dev_shared_nll": float(dev_base.mean()),
        "mean_nll": {k: float(v.mean()) for k, v in scores.items()},
        "comparisons": comparisons,
        "per_user_nll": {k: v.mean(axis=1).tolist() for k, v in scores.items()},
        "wall_s": time.perf_counter() - start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "report.md").write_text(markdown(results))
    print(markdown(results))


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# A per-user part learned across users: delta = W · history embedding (headlines)",
        "",
        f"Command: `{r['command']}`",
        "",
        f"Selection on the dev authors' test headlines (shared: {r['dev_shared_nll']:.4f}); "
        "'- shared' with a 95% interval over the dev authors:",
        "",
        "| W (variant, rank, step) | dev NLL | - shared [95% CI] | train NLL | median delta norm |",
        "|---|---|---|---|---|",
    ]
    for k, s in r["selection"].items():
        m, lo, hi = s["minus_shared"]
        lines.append(
            f"| {k} | {s['dev_nll']:.4f} | {m:+.4f} [{lo:+.4f}, {hi:+.4f}] | "
            f"{s['train_nll']:.4f} | {s['delta_norm']:.2f} |"
        )
    chosen = ", ".join(
        f"{v}: rank {c['rank']}, {c['step']} steps (eval delta norm {c['eval_delta_norm']:.2f})"
        for v, c in r["chosen"].items()
    )
    lines += [
        "",
        f"Chosen: {chosen}.",
        "",
        f"Eval authors: {r['users']}, {r['queries']} test headlines.",
        "",
        "| row | mean NLL (nats/token) |",
        "|---|---|",
        *[f"| {k} | {v:.4f} |" for k, v in r["mean_nll"].items()],
        "",
        "Paired differences (negative = the first is better); 95% bootstrap interval "
        "resampling users; p: sign-flip over users; Holm over the four pre-registered.",
        "",
        "| comparison | diff | 95% CI | MDE | users first better | p | p (Holm) |",
        "|---|---|---|---|---|---|---|",
        *[
            comparison_line(k, c, c["users_better"], r["users"])
            for k, c in r["comparisons"].items()
        ],
        "",
        f"Wall time {r['wall_s']:.0f}s (cached W and NLLs are not recomputed).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
