"""``fints bench``: the real-data benchmark, as one typer-compatible function.

Register it with ``app.command("bench")(bench)``. ``--preset small`` is what
``make bench`` runs (a few users, every task, the main methods and controls);
``--preset full`` is the recorded run. Every option overrides the preset.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer

from fints.benchmark.latency import measure_latency
from fints.benchmark.methods import (
    ALL_ENTRIES,
    DEFAULT_TAU,
    BenchContext,
    MethodSpec,
    benchmark_sites,
)
from fints.benchmark.metrics import TextClassifier, paired_bootstrap
from fints.benchmark.report import TaskReport, judge_name, task_markdown, write_report
from fints.benchmark.runner import (
    Row,
    Runner,
    SearchSpace,
    Selection,
    build_judge,
    deduplicated,
    default_fints,
    evaluate,
    methods_for_test,
    select_fints,
)
from fints.benchmark.tasks import (
    ABSTRACTS_FILE,
    DEFAULT_DATA_DIR,
    HEADLINES_FILE,
    PersonaConfig,
    SplitConfig,
    Task,
    load_abstracts,
    load_headlines,
    load_persona,
)
from fints.errors import FintsError, InvalidInputError
from fints.extraction import CONTRASTS
from fints.generation import GenerationOptions
from fints.paths import fints_home
from fints.sites import Component, Site, parse_sites

TASKS = ("headlines", "abstracts", "persona")
COMPONENTS = ("attn+mlp", *(c.value for c in Component))  # what a search may try at a layer


@dataclass(frozen=True)
class Preset:
    max_users: dict[str, int | None]
    n_test: dict[str, int]
    n_val: dict[str, int]
    max_history: dict[str, int]
    max_new_tokens: dict[str, int]
    strengths: tuple[float, ...]
    absolute_strengths: tuple[float, ...]
    components: tuple[str, ...]
    aggregations: tuple[str, ...]
    top_ks: tuple[int, ...]  # searched after the task's default K (ALL_ENTRIES: all)
    taus: tuple[float, ...]  # attentive temperatures searched; the search starts at the first
    icl_k: tuple[int, ...]
    contrasts: tuple[str, ...]
    variants: bool  # site / aggregation / icl / contrast variants on test
    extra_baselines: bool  # PCA and logistic user vectors beside the mean one
    baselines: tuple[str, ...] | None  # baseline rows kept on test (None: all)
    sparsity: tuple[float, ...]
    persona_sizes: tuple[int, ...]
    clusters: int


PRESETS: dict[str, Preset] = {
    # make bench: a smoke run of every task with the main methods and controls.
    "small": Preset(
        max_users={"headlines": 4, "abstracts": 3, "persona": 3},
        n_test={"headlines": 2, "abstracts": 1, "persona": 2},
        n_val={"headlines": 1, "abstracts": 1, "persona": 1},
        max_history={"headlines": 6, "abstracts": 4, "persona": 6},
        max_new_tokens={"headlines": 20, "abstracts": 48, "persona": 32},
        strengths=(0.2,),
        absolute_strengths=(),
        components=("attn+mlp",),
        aggregations=("attentive",),
        top_ks=(),
        taus=(DEFAULT_TAU,),
        icl_k=(0,),
        contrasts=("context",),
        variants=False,
        extra_baselines=False,
        baselines=("none", "icl k=1", "icl k=3", "user vector (mean)"),
        sparsity=(),
        persona_sizes=(),
        clusters=0,
    ),
    # The recorded CPU run (see BENCHMARKS.md): what fits in about an hour on 2 shared cores.
    "medium": Preset(
        max_users={"headlines": 25, "abstracts": 10, "persona": None},
        n_test={"headlines": 4, "abstracts": 2, "persona": 6},
        n_val={"headlines": 1, "abstracts": 1, "persona": 2},
        max_history={"headlines": 8, "abstracts": 6, "persona": 10},
        max_new_tokens={"headlines": 24, "abstracts": 64, "persona": 48},
        strengths=(0.1, 0.3),
        absolute_strengths=(),
        components=("attn+mlp", "attn"),
        aggregations=("attentive",),
        top_ks=(),
        taus=(DEFAULT_TAU,),
        icl_k=(0,),
        contrasts=("context",),
        variants=False,
        extra_baselines=False,
        baselines=("none", "icl k=3", "user vector (mean)"),
        sparsity=(),
        persona_sizes=(),
        clusters=3,
    ),
    # The full specification (every variant, sparsity, >= 200 / 100 queries); needs a GPU
    # or many CPU hours.
    "full": Preset(
        max_users={"headlines": None, "abstracts": None, "persona": None},
        n_test={"headlines": 5, "abstracts": 3, "persona": 12},
        n_val={"headlines": 2, "abstracts": 1, "persona": 3},
        max_history={"headlines": 30, "abstracts": 20, "persona": 50},
        max_new_tokens={"headlines": 24, "abstracts": 128, "persona": 64},
        strengths=(0.05, 0.15, 0.4),
        absolute_strengths=(2.0, 8.0),
        components=("attn+mlp", "attn", "mlp", "block"),
        aggregations=("attentive", "mean"),
        top_ks=(1, ALL_ENTRIES),
        taus=(DEFAULT_TAU, 0.03, 0.3),
        icl_k=(0, 3),
        contrasts=("context", "response"),
        variants=True,
        extra_baselines=True,
        baselines=None,
        sparsity=(0.05, 0.1, 0.25, 0.5),
        persona_sizes=(5, 10, 25),
        clusters=3,
    ),
}


def _items(text: str) -> tuple[str, ...]:
    """The non-empty entries of a comma-separated option, stripped."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _floats(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(x) for x in _items(text))
    except ValueError:
        raise InvalidInputError(f"--{name} must be comma-separated numbers, got {text!r}") from None


def _ints(text: str | None, name: str) -> tuple[int, ...] | None:
    values = _floats(text, name)
    return None if values is None else tuple(int(v) for v in values)


def _top_ks(text: str) -> tuple[int, ...]:
    """``--top-ks``: positive integers, or ``all`` for the whole dictionary."""
    values = _items(text)
    if not all(v == "all" or (v.isdigit() and int(v) >= 1) for v in values):
        raise InvalidInputError(f"--top-ks takes positive integers or 'all', got {text!r}")
    return tuple(ALL_ENTRIES if v == "all" else int(v) for v in values)


def _choices(text: str | None, name: str, allowed: tuple[str, ...]) -> tuple[str, ...] | None:
    if text is None:
        return None
    values = _items(text)
    wrong = [v for v in values if v not in allowed]
    if wrong or not values:
        raise InvalidInputError(f"--{name} takes some of {', '.join(allowed)}; got {text!r}")
    return values


def load_task(
    name: str, preset: Preset, data_dir: Path, seed: int, overrides: dict[str, Any]
) -> Task:
    cfg: dict[str, Any] = {
        k: overrides.get(k) if overrides.get(k) is not None else getattr(preset, k)[name]
        for k in ("max_users", "n_test", "n_val", "max_history", "max_new_tokens")
    }
    if name == "persona":
        return load_persona(
            overrides.get("persona_dir"),
            PersonaConfig(
                n_test=cfg["n_test"], n_val=cfg["n_val"], max_history=cfg["max_history"],
                moods=None if cfg["max_users"] is None else _first_moods(cfg["max_users"]),
                seed=seed,
            ),
            max_new_tokens=cfg["max_new_tokens"],
        )  # fmt: skip
    split = SplitConfig(
        min_items=max(overrides.get("min_items") or 20, cfg["n_test"] + cfg["n_val"] + 1),
        n_test=cfg["n_test"],
        n_val=cfg["n_val"],
        max_history=cfg["max_history"],
        max_users=cfg["max_users"],
        seed=seed,
    )
    if name == "headlines":
        path = overrides.get("headlines_file") or data_dir / HEADLINES_FILE
        return load_headlines(path, split, cfg["max_new_tokens"])
    path = overrides.get("abstracts_file") or data_dir / ABSTRACTS_FILE
    return load_abstracts(path, split, cfg["max_new_tokens"])


def _first_moods(n: int) -> tuple[str, ...]:
    from fints.benchmark.tasks import moodswapper_dir

    return tuple(sorted(p.stem for p in moodswapper_dir().glob("*.jsonl"))[:n])


def diagnostics(ctx: BenchContext, spec: MethodSpec) -> dict[str, Any]:
    """Vector norms against the site's activation norm; within- vs across-user agreement."""
    sites = parse_sites(spec.sites)
    per_user = {u: ctx.bank(u, spec.contrast) for u in ctx.task.users}
    out: dict[str, Any] = {"contrast": spec.contrast}
    for site in sites:
        vecs, owners, ratios, mean_ratios = [], [], [], []
        for user, bank in per_user.items():
            idx = bank.index([site])[0]
            diffs = bank.differences[:, idx]
            norm = float(bank.site_norms[idx])
            ratios.append(float(diffs.norm(dim=-1).mean()) / norm)
            mean_ratios.append(float(diffs.mean(dim=0).norm()) / norm)
            vecs.append(diffs / diffs.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            owners += [user] * len(diffs)
        unit = torch.cat(vecs)
        cos = unit @ unit.T
        same = torch.tensor([[a == b for b in owners] for a in owners])
        eye = torch.eye(len(owners), dtype=torch.bool)
        user_means = torch.stack([v.mean(dim=0) for v in vecs])
        user_means = user_means / user_means.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        between = user_means @ user_means.T
        off = ~torch.eye(len(vecs), dtype=torch.bool)
        out[str(site)] = {
            "item_vector_norm / site_norm": round(float(np.mean(ratios)), 4),
            "user_mean_vector_norm / site_norm": round(float(np.mean(mean_ratios)), 4),
            "cosine items same user": round(float(cos[same & ~eye].mean()), 4),
            "cosine items different users": round(float(cos[~same].mean()), 4),
            "cosine user-mean vectors across users": round(float(between[off].mean()), 4),
        }
    return out


def clusters(ctx: BenchContext, rows: Sequence[Row], k: int, seed: int) -> list[dict[str, Any]]:
    """Users grouped by KMeans on their mean history-output embedding; scores per group."""
    from sklearn.cluster import KMeans

    users = sorted(ctx.task.users)
    if k < 2 or len(users) < 2 * k:
        return []
    emb = torch.stack(
        [ctx.encoder.encode([i.output for i in ctx.task.users[u].history]).mean(0) for u in users]
    ).numpy()
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(emb)
    group = dict(zip(users, labels.tolist(), strict=True))
    queries = ctx.task.queries("test")
    out = []
    keep = {"none", "icl k=3", "fints (best on val)"} | {
        r.label for r in rows if r.role == "control"
    }
    for c in range(k):
        mask = np.array([group[q.user] == c for q in queries])
        for row in rows:
            if row.label not in keep:
                continue
            out.append(
                {
                    "cluster": c,
                    "users": sum(1 for g in group.values() if g == c),
                    "queries": int(mask.sum()),
                    "label": row.label,
                    "rouge1": float(row.scores.rouge1[mask].mean()),
                    "rougeL": float(row.scores.rougeL[mask].mean()),
                    "judge": float(row.judge_hits[mask].mean()),
                }
            )
    return out


def sparsity(
    base: Task,
    model: Any,
    encoder: Any,
    sites: Any,
    best: MethodSpec,
    judge: TextClassifier,
    options: GenerationOptions,
    args: dict[str, Any],
    *,
    fractions: Sequence[float],
    sizes: Sequence[int],
) -> list[dict[str, Any]]:
    """Best Fints, its random control and ICL with less history per user (and with all)."""
    points: list[tuple[Any, Task]] = [(f, base.with_history_fraction(f)) for f in fractions]
    points += [(n, base.with_history_size(n)) for n in sizes]
    if points:  # the whole history: the main run's rows, from the cache
        longest = max(len(u.history) for u in base.users.values())
        points.append((1.0 if fractions else longest, base))
    specs = [
        best,
        best.with_(label="control: random direction", vector_source="random", role="control"),
        MethodSpec("icl k=3", kind="icl", icl_k=3, role="baseline"),
    ]
    none = MethodSpec("none", role="baseline")
    out = []
    for x, task in points:
        runner = task_runner(task, model, encoder, sites, options, args)
        rows = evaluate(runner, [none, *specs], judge)
        for row in rows[1:]:
            s = row.summary()
            shown = f"{x:.0%}" if isinstance(x, float) else f"{x} items"
            out.append(
                {
                    "history": shown,
                    "x": x,
                    "label": row.label,
                    **s,
                    "delta_rougeL": str(paired_bootstrap(row.scores.rougeL, rows[0].scores.rougeL)),
                }
            )
    return out


def task_runner(
    task: Task,
    model: Any,
    encoder: Any,
    sites: tuple[Site, ...],
    options: GenerationOptions,
    args: dict[str, Any],
) -> Runner:
    """A runner over a fresh context for ``task``, caching under ``args["cache"]``."""
    ctx = BenchContext(model, encoder, task, sites, args["cache"], seed=args["seed"])
    return Runner(ctx, options, args["cache"], batch_size=args["batch_size"])


def rows_for_test(
    selection: Selection, preset: Preset, rows: Sequence[str] | None
) -> list[MethodSpec]:
    """The rows run on test: the preset's choice, or exactly the labels in ``rows``.

    A named variant that coincides with the chosen setting (``fints response
    contrast`` when the response contrast was chosen) is run once, as the first
    label naming it.
    """
    every = methods_for_test(
        selection.best, selection.best_absolute, preset.contrasts, unique=False
    )
    if rows is not None:
        known = list(dict.fromkeys(s.label for s in every))
        unknown = [r for r in rows if r not in known]
        if unknown:
            raise InvalidInputError(f"unknown row(s) {unknown}: expected some of {known}")
        return deduplicated([s for s in every if s.label in rows])
    specs = deduplicated(every)
    if not preset.variants:
        specs = [s for s in specs if s.role != "variant"]
    if preset.baselines is not None:
        keep = preset.baselines
        specs = [s for s in specs if s.role != "baseline" or s.label in keep]
    if not preset.extra_baselines:
        specs = [s for s in specs if s.label not in ("user vector (pca)", "user vector (logistic)")]
    kept_icl = {s.icl_k for s in specs if s.kind == "icl" and s.icl_source == "own"}
    return [s for s in specs if s.kind != "icl" or s.icl_source == "own" or s.icl_k in kept_icl]


def steers(specs: Sequence[MethodSpec]) -> bool:
    """Whether any row uses steering vectors (and so needs the validation search)."""
    return any(s.kind in ("vector", "fints") for s in specs)


def benchmark_task(
    task: Task,
    model: Any,
    encoder: Any,
    preset: Preset,
    layers: tuple[int, ...],
    args: dict[str, Any],
) -> TaskReport:
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    sites = benchmark_sites(model.num_layers, layers)
    options = GenerationOptions(max_new_tokens=task.max_new_tokens)
    runner = task_runner(task, model, encoder, sites, options, args)
    ctx = runner.ctx
    judge = build_judge(task, args["seed"])
    top_k = 3 if task.name == "abstracts" else 5
    top_ks = (top_k, *(k for k in preset.top_ks if k != top_k))
    space = SearchSpace(
        layers=layers,
        strengths=preset.strengths,
        absolute_strengths=preset.absolute_strengths,
        components=preset.components,
        top_k=top_ks,
        aggregations=preset.aggregations,
        taus=preset.taus,
        icl_k=preset.icl_k,
        contrasts=preset.contrasts,
        rounds=args["search_rounds"],
        margin=args["search_margin"],
    )
    selection = Selection(default_fints(space), None, [])
    if steers(rows_for_test(selection, preset, args["rows"])):
        t = time.perf_counter()
        selection = select_fints(runner, space, judge)
        seconds["validation search"] = time.perf_counter() - t
    specs = rows_for_test(selection, preset, args["rows"])
    t = time.perf_counter()
    rows = evaluate(runner, specs, judge)
    seconds["test methods"] = time.perf_counter() - t
    report = TaskReport(
        name=task.name,
        judge_name=judge_name(task.name),
        source=task.source,
        sha256=task.sha256,
        users=len(task.users),
        test_queries=len(task.queries("test")),
        validation_queries=len(task.queries("validation")),
        max_new_tokens=task.max_new_tokens,
        rows=rows,
        chosen=selection.best.describe() if steers(specs) else "",  # no search without it
        selection_log=selection.log,
        selection_kept=selection.kept,
    )
    if args["timing_repeats"]:
        timed = [s for s in specs if s.label in ("none", "icl k=3", report.best_label)]
        report.latency = measure_latency(
            ctx, timed, options, batch_size=args["batch_size"], repeats=args["timing_repeats"]
        )
    if steers(specs):
        report.diagnostics = diagnostics(ctx, selection.best)
    if preset.clusters:
        report.clusters = clusters(ctx, rows, preset.clusters, args["seed"])
    fractions = preset.sparsity if task.name != "persona" else ()
    sizes = preset.persona_sizes if task.name == "persona" else ()
    if (fractions or sizes) and steers(specs):  # the sweep varies the chosen Fints
        t = time.perf_counter()
        report.sparsity = sparsity(
            task, model, encoder, sites, selection.best.with_(label="fints (best on val)"),
            judge, options, args, fractions=fractions, sizes=sizes,
        )  # fmt: skip
        seconds["sparsity"] = time.perf_counter() - t
    seconds["extraction (inside the above)"] = ctx.extraction_seconds
    seconds["total"] = time.perf_counter() - started
    report.seconds = seconds
    return report


def bench(
    preset: Annotated[
        str, typer.Option(help="small (make bench), medium (the recorded CPU run) or full")
    ] = "full",
    tasks: Annotated[str, typer.Option(help="comma-separated: headlines,abstracts,persona")] = (
        "headlines,abstracts,persona"
    ),
    model: Annotated[
        str | None, typer.Option(help="HF id, folder or .gguf (default: embedded SmolLM2)")
    ] = None,
    data_dir: Annotated[Path, typer.Option(help="folder with the JSONL data")] = DEFAULT_DATA_DIR,
    headlines_file: Annotated[Path | None, typer.Option(help="news JSONL file")] = None,
    abstracts_file: Annotated[Path | None, typer.Option(help="arXiv JSONL file")] = None,
    persona_dir: Annotated[Path | None, typer.Option(help="folder of mood JSONL files")] = None,
    out: Annotated[Path | None, typer.Option(help="results folder")] = None,
    cache: Annotated[Path | None, typer.Option(help="generation cache folder")] = None,
    layers: Annotated[str | None, typer.Option(help="layers to search, e.g. 10,15")] = None,
    max_users: Annotated[int | None, typer.Option(help="users per task")] = None,
    n_test: Annotated[int | None, typer.Option(help="test queries per user")] = None,
    n_val: Annotated[int | None, typer.Option(help="validation queries per user")] = None,
    queries_per_user: Annotated[
        int | None, typer.Option(help="score only the first N test queries per user")
    ] = None,
    max_history: Annotated[int | None, typer.Option(help="history items per user")] = None,
    min_items: Annotated[int | None, typer.Option(help="records a user needs")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="generation cap")] = None,
    strengths: Annotated[str | None, typer.Option(help="relative strengths to search")] = None,
    components: Annotated[
        str | None, typer.Option(help="site components to search: attn+mlp,attn,mlp,block")
    ] = None,
    contrasts: Annotated[
        str | None, typer.Option(help="contrasts to search: context,response")
    ] = None,
    top_ks: Annotated[
        str | None,
        typer.Option(
            help="retrieved entries K to search beside the task's default, 'all': every one"
        ),
    ] = None,
    taus: Annotated[
        str | None,
        typer.Option(help="attentive temperatures to search (the search starts at the first)"),
    ] = None,
    search_rounds: Annotated[
        int, typer.Option(help="passes of the validation search (2+: revisit early choices)")
    ] = 1,
    search_margin: Annotated[
        float,
        typer.Option(
            help="standard errors of the paired validation gain a stage's winner needs to "
            "replace the current setting (0: any gain)"
        ),
    ] = 0.0,
    sparsity_fractions: Annotated[str | None, typer.Option(help="e.g. 0.05,0.1,0.25")] = None,
    persona_sizes: Annotated[
        str | None, typer.Option(help="persona history sizes to sweep, e.g. 5,10,25")
    ] = None,
    n_clusters: Annotated[int | None, typer.Option(help="user clusters (0: none)")] = None,
    rows: Annotated[
        str | None,
        typer.Option(
            help="comma-separated test rows to run instead of the preset's, e.g. "
            "'none,icl k=3,control: icl k=3 wrong user' (no steering row: no search)"
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="rows per generate call")] = 16,
    timing_repeats: Annotated[
        int, typer.Option(help="interleaved latency runs of one batch per method (0: skip)")
    ] = 2,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16")] = "auto",
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Benchmark personalization methods and controls on real per-user data."""
    try:
        _bench(**locals())
    except FintsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _bench(**kw: Any) -> None:
    if kw["preset"] not in PRESETS:
        raise InvalidInputError(f"unknown preset {kw['preset']!r}: expected {sorted(PRESETS)}")
    chosen = list(_items(kw["tasks"]))
    unknown = [t for t in chosen if t not in TASKS]
    if unknown or not chosen:
        raise InvalidInputError(f"unknown task(s) {unknown}: expected some of {TASKS}")
    if kw["search_rounds"] < 1:
        raise InvalidInputError(f"--search-rounds must be at least 1, got {kw['search_rounds']}")
    if not kw["search_margin"] >= 0:
        raise InvalidInputError(f"--search-margin must be >= 0, got {kw['search_margin']}")
    preset = PRESETS[kw["preset"]]
    strengths = _floats(kw["strengths"], "strengths")
    taus = _floats(kw["taus"], "taus")
    if taus is not None and not all(t > 0 for t in taus):
        raise InvalidInputError(f"--taus must be positive numbers, got {kw['taus']!r}")
    fractions = _floats(kw["sparsity_fractions"], "sparsity-fractions")
    sizes = _ints(kw["persona_sizes"], "persona-sizes")
    preset = replace(
        preset,
        strengths=strengths or preset.strengths,
        top_ks=_top_ks(kw["top_ks"]) if kw["top_ks"] is not None else preset.top_ks,
        taus=taus or preset.taus,
        components=_choices(kw["components"], "components", COMPONENTS) or preset.components,
        contrasts=_choices(kw["contrasts"], "contrasts", CONTRASTS) or preset.contrasts,
        sparsity=fractions if fractions is not None else preset.sparsity,
        persona_sizes=sizes if sizes is not None else preset.persona_sizes,
        clusters=kw["n_clusters"] if kw["n_clusters"] is not None else preset.clusters,
    )
    from fints.encoders import SentenceTransformerEncoder
    from fints.models import load_model

    torch.manual_seed(kw["seed"])
    started = time.perf_counter()
    loaded = load_model(kw["model"], dtype=kw["dtype"])
    encoder = SentenceTransformerEncoder()
    layers = _ints(kw["layers"], "layers") or tuple(
        sorted({loaded.num_layers // 3, loaded.num_layers // 2})
    )
    run_name = f"{kw['preset']}-{Path(loaded.name).stem}-seed{kw['seed']}"
    out = kw["out"] or Path("benchmarks/results") / run_name
    args = {
        "cache": kw["cache"] or fints_home() / "bench",
        "seed": kw["seed"],
        "batch_size": kw["batch_size"],
        "timing_repeats": kw["timing_repeats"],
        "search_rounds": kw["search_rounds"],
        "search_margin": kw["search_margin"],
        "rows": None if kw["rows"] is None else [r.strip() for r in kw["rows"].split(",")],
    }
    overrides = {k: kw[k] for k in ("max_users", "n_test", "n_val", "max_history",
                                    "max_new_tokens", "min_items", "headlines_file",
                                    "abstracts_file", "persona_dir")}  # fmt: skip
    reports = []
    for name in chosen:
        task = load_task(name, preset, Path(kw["data_dir"]), kw["seed"], overrides)
        if kw["queries_per_user"]:
            task = task.limit_test(kw["queries_per_user"])
        typer.echo(
            f"[{name}] {len(task.users)} users, {len(task.queries('test'))} test / "
            f"{len(task.queries('validation'))} validation queries",
            err=True,
        )
        report = benchmark_task(task, loaded, encoder, preset, layers, args)
        reports.append(report)
        typer.echo(task_markdown(report))
    header = {
        "command": _command_line(),
        "model": f"{loaded.name} (fingerprint {loaded.fingerprint[:12]}, dtype {loaded.dtype})",
        "seed": kw["seed"],
        "preset": kw["preset"],
        "layers searched": layers_searched(reports, layers),
        "data sha256": "; ".join(f"{r.name}: {r.sha256}" for r in reports),
        "machine": f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}",
        "wall time": f"{time.perf_counter() - started:.0f} s",
    }
    md = write_report(out, reports, header)
    typer.echo(f"results written to {md}", err=True)


def layers_searched(reports: list[TaskReport], layers: tuple[int, ...]) -> str:
    """The header's line: a probe-only run (no row steers) searches no layer."""
    if any(r.selection_log for r in reports):
        return ", ".join(map(str, layers))
    return "none (no row steers)"


def _command_line() -> str:
    args = " ".join(map(shlex.quote, sys.argv[1:]))
    if sys.argv[0].endswith("commands.py"):
        return f"python -m fints.benchmark.commands {args}"
    if "bench" in sys.argv[1:2]:
        return f"fints {args}"
    return " ".join(map(shlex.quote, sys.argv))


def main() -> None:  # python -m fints.benchmark.commands
    typer.run(bench)


if __name__ == "__main__":
    main()
