"""Probe: do trained "shared + per-user delta" steering vectors carry the user's signal?

Headlines (``short_description`` -> ``headline``), SmolLM2, bare prompt (no examples).
Per author (>= 20 articles, sorted by date): the last ``--test`` items are test queries;
the ``--history`` items before them are the history, whose latest quarter is held out
(early stopping, when ``--patience`` > 0). ``v_shared`` is trained on all authors'
history; each author's delta starts from it (L2 penalty ``--l2``). Authors are split
(seeded) into ``--dev`` authors, on which ``trained_sweep.py`` chooses the delta
settings, and the rest, on which this script measures. The metric is the per-token NLL
of the gold test headline (teacher-forced, ``<|im_end|>`` included), per row:

* none, shared, own = shared + own delta, wrong-user delta (shared + another author's
  delta), random delta (shared + a random direction of the own delta's norm);
* ICL k=3 own and wrong user (the k history items nearest the query in the prompt, as
  the product retrieves them), own + ICL, shared + ICL;
* shared + the mean of the other authors' deltas, own from zero (``--zero``), the
  per-item rows with retrieval (``--item-steps``, see ``trained_items.py``) and deltas
  trained from that mean instead of the shared vector (``--rebase``, see
  ``trained_rebase.py``).

Paired differences get 95% bootstrap intervals resampling users (not queries),
sign-flip p-values over users and the minimum detectable effect
(:mod:`fints.benchmark.stats`); the three pre-registered comparisons (own vs wrong-user
delta, own vs shared, own vs ICL k=3 own) are Holm-corrected. Trained vectors and each
row's NLLs are cached under ``--cache`` so a rerun resumes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/trained_probe.py --authors 64 --dev 12
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/trained_probe.py --cost-only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from trained_generation import generation_scores
from trained_items import add_arguments as add_item_arguments
from trained_items import per_item_rows
from trained_rebase import OWN_REBASED, REBASED, mean_of_others, rebased_rows
from trained_rebase import add_arguments as add_rebase_arguments
from trained_report import cluster_stats, generation_report, markdown, report

from fints.benchmark.persona import PersonaConfig, load_persona
from fints.benchmark.tasks import (
    SplitConfig,
    UserSplit,
    abstract_records,
    file_sha256,
    headline_records,
    read_jsonl,
    time_split,
)
from fints.encoders import SentenceTransformerEncoder
from fints.history import HistoryItem
from fints.models import LoadedModel, load_model
from fints.prompts import TEMPLATES, build_prompt_ids
from fints.retrieval import nearest_items
from fints.sites import Site, default_sites, parse_sites
from fints.target_nll import Example, target_nll
from fints.vector_training import (
    TrainedVectors,
    TrainingConfig,
    holdout_latest,
    train_vectors,
    training_cost_ratio,
)

DATA = Path("/work/shared/data")
#: task: (records loader, prompt template, file under --data)
TASKS = {
    "headlines": (headline_records, "headline", "news_headlines.jsonl"),
    "abstracts": (abstract_records, "abstract", "arxiv_abstracts.jsonl"),
}
OUT = Path("benchmarks/results/trained-probe")


@dataclass
class Author:
    name: str
    train: list[Example]  # history minus its latest quarter
    valid: list[Example]  # the latest quarter of the history (early stopping)
    test: list[Example]
    history: list[HistoryItem]  # the whole history, oldest first (ICL rows retrieve from it)
    queries: list[str]  # the test inputs, in the order of ``test``
    references: list[str]  # the gold test outputs
    template: str  # the task's prompt template (ICL rows)


def add_vector_arguments(
    parser: argparse.ArgumentParser, *, delta: bool = True, delta_l2: str = "--l2", **defaults: Any
) -> None:
    """The options that decide the authors, their splits and the trained vectors (the cache
    keys depend on them), with the caller's ``defaults`` (e.g. :data:`EVAL_RUN`, to read
    the measured run's vectors). ``delta``: also the per-user delta's optimizer options,
    its L2 under the flag ``delta_l2``."""
    d = {
        "authors": 16, "dev": 0, "history": 16, "test": 4, "valid_fraction": 0.25,
        "shared_steps": 40, "steps": 10, "lr": 0.05, "l2": 1e-3, "patience": 3,
    } | defaults  # fmt: skip
    add = parser.add_argument
    add("--data", type=Path, default=DATA, help="folder of the task files")
    add("--task", choices=[*TASKS, "persona"], default="headlines")
    add("--max-target-tokens", type=int, default=32, help="in training")
    add("--authors", type=int, default=d["authors"])
    add("--dev", type=int, default=d["dev"], help="authors settings are chosen on")
    add("--history", type=int, default=d["history"])
    add("--test", type=int, default=d["test"])
    add("--valid-fraction", type=float, default=d["valid_fraction"])
    add("--sites", default="", help="default: the middle layer's block output (15.block)")
    add("--shared-steps", type=int, default=d["shared_steps"])
    add("--shared-lr", type=float, default=0.1)
    if delta:
        add("--steps", type=int, default=d["steps"], help="the user's delta")
        add("--lr", type=float, default=d["lr"], help="the user's delta")
        add(delta_l2, type=float, default=d["l2"], help="the user's delta")
        add("--patience", type=int, default=d["patience"], help="0: no early stopping")


#: The measured run's settings (BENCHMARKS.md, "Trained vectors: shared + per-user
#: delta"): the defaults of the probes that read its cached vectors.
EVAL_RUN: dict[str, Any] = {
    "authors": 64, "dev": 12, "shared_steps": 60, "steps": 4, "lr": 0.05, "l2": 0.0,
    "patience": 0,
}  # fmt: skip


def probe_sites(model: LoadedModel, args: argparse.Namespace) -> tuple[Site, ...]:
    """``--sites``, or the model's middle block output; written back to ``args.sites``."""
    sites = parse_sites(args.sites) if args.sites else default_sites(model.num_layers, "block")
    args.sites = ",".join(str(s) for s in sites)
    return sites


def task_splits(args: argparse.Namespace) -> tuple[dict[str, UserSplit], str, str]:
    """The users' splits of ``--task``, its prompt template and the digest of its data.

    Headlines and abstracts: authors with >= 20 items, split by date. Persona: each of
    moodswapper's moods is a user (the benchmark's persona loader)."""
    if args.task == "persona":
        task = load_persona(config=PersonaConfig(n_test=args.test, max_history=args.history))
        return task.users, task.template, task.sha256
    load, template, file = TASKS[args.task]
    path = args.data / file
    split = SplitConfig(
        min_items=20,
        n_test=args.test,
        n_val=0,
        max_history=args.history,
        max_users=args.authors,
        seed=0,
    )
    return time_split(load(read_jsonl(path), str(path)), split), template, file_sha256(path)


def load_authors(model: LoadedModel, args: argparse.Namespace) -> list[Author]:
    splits, template_name, _ = task_splits(args)
    tok, template = model.tokenizer, TEMPLATES[template_name]

    def encode(article: str, headline: str) -> Example:
        prompt = build_prompt_ids(tok, template, article)
        target = list(tok(headline, add_special_tokens=False)["input_ids"])
        return prompt, [*target, tok.eos_token_id]

    authors = []
    for name, user in sorted(splits.items()):
        history = [encode(i.input, i.output) for i in user.history]
        train, valid = holdout_latest(history, args.valid_fraction)
        test = [encode(q.input, q.reference) for q in user.test]
        authors.append(
            Author(
                name, train, valid, test, list(user.history),
                [q.input for q in user.test], [q.reference for q in user.test],
                template_name,
            )
        )  # fmt: skip
    return authors


def cache_key(model: LoadedModel, args: argparse.Namespace, *parts: Any) -> str:
    payload = json.dumps(
        [
            model.fingerprint,
            task_splits(args)[2],
            args.authors,
            args.history,
            args.test,
            args.valid_fraction,
            *parts,
            # a non-default precision is part of what the vectors were trained with
            *([] if getattr(args, "dtype", "auto") == "auto" else [args.dtype]),
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


def shared_config(args: argparse.Namespace) -> TrainingConfig:
    """How the shared vector is trained (the probe and the sweep share it, and its cache)."""
    return TrainingConfig(
        steps=args.shared_steps,
        lr=args.shared_lr,
        l2=0.0,
        batch_size=32,
        patience=5,
        max_target_tokens=args.max_target_tokens,
    )


def configs(args: argparse.Namespace) -> dict[str, TrainingConfig]:
    return {
        "shared": shared_config(args),
        "delta": TrainingConfig(
            steps=args.steps,
            lr=args.lr,
            l2=args.l2,
            patience=args.patience or None,
            valid_fraction=args.valid_fraction,
            max_target_tokens=args.max_target_tokens,
        ),
        "zero": TrainingConfig(steps=12, lr=0.1, l2=0.0, patience=3),
    }


def train_all(
    model: LoadedModel,
    authors: list[Author],
    evaluated: list[Author],
    sites: tuple[Site, ...],
    args: argparse.Namespace,
) -> tuple[TrainedVectors, dict[str, TrainedVectors], dict[str, TrainedVectors]]:
    """The shared vector (on every author's history) and, for the ``evaluated`` authors,
    their deltas (and, with ``--zero``, vectors trained from zero)."""
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
    dkey = cache_key(model, args, key, cfg["delta"].to_dict(), "last" if not args.patience else "")
    zkey = cache_key(model, args, [str(s) for s in sites], cfg["zero"].to_dict())
    for n, a in enumerate(evaluated):
        tag = hashlib.sha256(a.name.encode()).hexdigest()[:10]
        deltas[a.name] = cached_training(
            root / f"delta-{dkey}-{tag}.pt",
            lambda a=a: train_vectors(
                model,
                sites,
                a.train,
                init=shared.values,
                config=cfg["delta"],
                # without early stopping the last update is kept, not the best on valid
                valid=a.valid if args.patience else None,
            ),
        )
        if args.zero:
            zeros[a.name] = cached_training(
                root / f"zero-{zkey}-{tag}.pt",
                lambda a=a: train_vectors(model, sites, a.train, config=cfg["zero"], valid=a.valid),
            )
        d = deltas[a.name]
        print(
            f"[{n + 1}/{len(evaluated)}] {a.name}: delta step {d.best_step}/{d.steps_run} "
            f"norm {(d.values - shared.values).norm():.2f}; {time.perf_counter() - start:.0f}s",
            flush=True,
        )
    return shared, deltas, zeros


Row = tuple[list[list[int]], list[torch.Tensor | None]]  # per author: prompts, vector


def split_authors(
    authors: list[Author], n_dev: int, seed: int = 0
) -> tuple[list[Author], list[Author]]:
    """(dev, eval): ``n_dev`` authors (seeded) on whose test headlines settings are chosen
    (``trained_sweep.py``), and the rest, on which they are measured."""
    order = np.random.default_rng(seed).permutation(len(authors))
    dev = sorted((authors[i] for i in order[:n_dev]), key=lambda a: a.name)
    rest = sorted((authors[i] for i in order[n_dev:]), key=lambda a: a.name)
    return dev, rest


def wrong_users(names: list[str], seed: int) -> dict[str, str]:
    """A derangement: each author's "wrong user" (another author, the same for every row)."""
    order = list(np.random.default_rng(seed).permutation(len(names)))
    return {names[order[i]]: names[order[(i + 1) % len(names)]] for i in range(len(names))}


def icl_prompts(
    model: LoadedModel, authors: list[Author], source: dict[str, str], k: int
) -> dict[str, list[list[int]]]:
    """Per author, each test prompt with the ``k`` history items of ``source[author]``
    nearest to the query (MiniLM keys), as the product's ICL retrieves them."""
    encoder = SentenceTransformerEncoder()
    by_name = {a.name: a for a in authors}
    keys = {a.name: encoder.encode([i.input for i in a.history]) for a in authors}
    out = {}
    for a in authors:
        b = by_name[source[a.name]]
        query_keys = encoder.encode(a.queries)
        out[a.name] = [
            build_prompt_ids(
                model.tokenizer,
                TEMPLATES[a.template],
                q,
                nearest_items(keys[b.name], b.history, key, k),
            )
            for q, key in zip(a.queries, query_keys, strict=True)
        ]
    return out


def probe_rows(
    model: LoadedModel,
    authors: list[Author],
    shared: TrainedVectors,
    deltas: dict[str, TrainedVectors],
    zeros: dict[str, TrainedVectors],
    seed: int,
    icl_k: int,
) -> dict[str, dict[str, Row]]:
    """Per row and author: the test prompts and the ``[sites, hidden]`` vector (None:
    unsteered)."""
    names = [a.name for a in authors]
    delta = {n: deltas[n].values - shared.values for n in names}
    wrong = wrong_users(names, seed)
    bare = {a.name: [p for p, _ in a.test] for a in authors}
    own_icl = icl_prompts(model, authors, {n: n for n in names}, icl_k)
    wrong_icl = icl_prompts(model, authors, wrong, icl_k)
    others = mean_of_others(delta)
    g = torch.Generator().manual_seed(seed)
    rows: dict[str, dict[str, Row]] = {}

    def add(
        label: str, name: str, prompts: Sequence[Sequence[int]], vector: torch.Tensor | None
    ) -> None:
        rows.setdefault(label, {})[name] = ([list(p) for p in prompts], [vector] * len(prompts))

    for n in names:
        direction = torch.randn(delta[n].shape, generator=g)
        scale = delta[n].norm(dim=1, keepdim=True) / direction.norm(dim=1, keepdim=True)
        own = shared.values + delta[n]
        add("none", n, bare[n], None)
        add("shared", n, bare[n], shared.values)
        add("own", n, bare[n], own)
        add("wrong-user delta", n, bare[n], shared.values + delta[wrong[n]])
        add("random delta", n, bare[n], shared.values + direction * scale)
        add(f"icl k={icl_k} (own)", n, own_icl[n], None)
        add(f"icl k={icl_k} (wrong user)", n, wrong_icl[n], None)
        add(f"own + icl k={icl_k}", n, own_icl[n], own)
        add(f"shared + icl k={icl_k}", n, own_icl[n], shared.values)
        if zeros:
            add("own from zero", n, bare[n], zeros[n].values)
        add("shared + mean other deltas", n, bare[n], shared.values + others[n])
    return rows


def evaluate(
    model: LoadedModel,
    authors: list[Author],
    sites: tuple[Site, ...],
    rows: dict[str, dict[str, Row]],
    cache: Path | None = None,
    tag: str = "",
) -> dict[str, np.ndarray]:
    """Per row, ``[authors, test queries]`` NLLs of the gold headlines (kept under
    ``cache``, named by ``tag`` (what made the vectors) and the row's label)."""
    targets = [t for a in authors for _, t in a.test]
    out = {}
    for label, per_author in rows.items():
        path = None
        if cache is not None:
            name = hashlib.sha256(f"{tag}|{label}".encode()).hexdigest()[:16]
            path = cache / f"nll-{name}.npy"
            if path.is_file():
                out[label] = np.load(path)
                print(f"{label}: {out[label].mean():.4f} (cached)", flush=True)
                continue
        prompts = [p for a in authors for p in per_author[a.name][0]]
        vecs = [v for a in authors for v in per_author[a.name][1]]
        vectors = None
        if any(v is not None for v in vecs):
            zero = torch.zeros(len(sites), model.hidden_size)
            stacked = torch.stack(
                [zero if v is None else v for v in vecs]
            )  # [queries, sites, hidden]
            vectors = {s: stacked[:, i] for i, s in enumerate(sites)}
        nll = target_nll(model, prompts, targets, vectors, batch_size=8).numpy()
        out[label] = nll.reshape(len(authors), -1)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, out[label])
        print(f"{label}: {out[label].mean():.4f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_vector_arguments(parser)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--cache", type=Path, default=OUT / "cache")
    parser.add_argument("--model", default=None, help="fints model name, HF id or folder")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--icl-k", type=int, default=3)
    parser.add_argument("--zero", action="store_true", help="also vectors trained from zero")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cost-only", action="store_true")
    parser.add_argument("--generate", action="store_true", help="also ROUGE and the judge")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rows", default="", help="only these rows (comma-separated) and own")
    add_item_arguments(parser)
    add_rebase_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype=args.dtype)
    sites = probe_sites(model, args)
    authors = load_authors(model, args)
    if args.cost_only:
        a = max(authors, key=lambda a: len(a.train) + len(a.valid))
        ratio = training_cost_ratio(model, sites, a.train + a.valid, config=configs(args)["delta"])
        print(json.dumps(ratio, indent=2))
        return
    start = time.perf_counter()
    _, evaluated = split_authors(authors, args.dev)
    shared, deltas, zeros = train_all(model, authors, evaluated, sites, args)
    rows = probe_rows(model, evaluated, shared, deltas, zeros, 0, args.icl_k)
    made_with = (configs(args)["delta"].to_dict(), args.patience, args.shared_steps, args.dev)
    tag = cache_key(model, args, [str(s) for s in sites], *made_with)
    own = {n: d.values for n, d in deltas.items()}
    bare = {a.name: [list(p) for p, _ in a.test] for a in evaluated}
    if args.item_steps:
        rows |= per_item_rows(model, sites, evaluated, own, bare, args, tag)
    if args.rebase:
        delta_config = configs(args)["delta"]
        rows |= rebased_rows(
            model, sites, evaluated, shared.values, own, delta_config, bare, args.cache, tag
        )
    wanted = ["own", *args.rows.split(",")] if args.rows else list(rows)
    scores = evaluate(model, evaluated, sites, {k: rows[k] for k in wanted}, args.cache, tag)
    delta_norms = [float((d.values - shared.values).norm()) for d in deltas.values()]
    training = [
        f"shared: {shared.config.to_dict()}, best step {shared.best_step} of "
        f"{shared.steps_run}, norm {shared.values.norm():.1f}",
        f"delta: {configs(args)['delta'].to_dict()}; best steps "
        f"{sorted(d.best_step for d in deltas.values())}; delta norm median "
        f"{np.median(delta_norms):.2f} (range {min(delta_norms):.2f}-{max(delta_norms):.2f})",
        *(
            [
                f"own from zero: {configs(args)['zero'].to_dict()}; best steps "
                f"{sorted(z.best_step for z in zeros.values())}; norm median "
                f"{np.median([float(z.values.norm()) for z in zeros.values()]):.1f}"
            ]
            if zeros
            else []
        ),
        f"wall time {time.perf_counter() - start:.0f}s on {args.threads} thread(s) "
        "(cached vectors are not retrained)",
    ]
    pairs = {}  # comparisons that are not "own minus a row"
    if OWN_REBASED in scores and REBASED in scores:
        diff = scores[OWN_REBASED] - scores[REBASED]
        pairs[f"{OWN_REBASED} minus {REBASED}"] = cluster_stats(diff, seed=0)
    extra = {"settings": {"sites": args.sites}, "training": training, "pairs": pairs}
    result = report(scores, args, extra)
    result["per_user_nll"] = {k: v.mean(axis=1).tolist() for k, v in scores.items()}
    if args.generate:
        generated, texts = generation_scores(
            model, evaluated, sites, rows, args.max_new_tokens, args.cache, tag
        )
        result["generation"] = generation_report(generated)
        result["answers"] = texts
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
