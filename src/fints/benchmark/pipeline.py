"""A benchmark run from its :class:`~fints.benchmark.settings.BenchSettings`: load each
task, search Fints settings on validation, run the test rows and the analyses, write
the report (and the settings beside it)."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from functools import partial
from pathlib import Path

import torch

from fints.benchmark.analyses import clusters, diagnostics, sparsity
from fints.benchmark.banks import BenchContext, benchmark_sites
from fints.benchmark.labels import REFERENCE_ICL_K, Label, Split, TaskName, judge_name
from fints.benchmark.latency import measure_latency
from fints.benchmark.persona import PersonaConfig, first_moods, load_persona
from fints.benchmark.presets import Preset, default_top_k
from fints.benchmark.report import TaskReport, task_markdown, write_report
from fints.benchmark.rows import default_method_rows, rows_for_test, steers
from fints.benchmark.runner import Runner, build_judge, evaluate
from fints.benchmark.search import SearchSpace, Selection, default_fints, select_fints
from fints.benchmark.settings import BenchSettings
from fints.benchmark.tasks import SplitConfig, Task, load_abstracts, load_headlines
from fints.encoders import KeyEncoder
from fints.generation import GenerationOptions
from fints.models import LoadedModel
from fints.sites import Site

#: Written beside results.md: the run's settings, for BenchSettings.from_dict.
SETTINGS_FILE = "settings.json"


def load_task(name: str, settings: BenchSettings) -> Task:
    """The task ``name`` at the settings' sizes (and test queries per user)."""
    sizes = settings.task_sizes(name)
    if name == TaskName.PERSONA:
        moods = None if sizes.max_users is None else first_moods(sizes.max_users)
        config = PersonaConfig(
            n_test=sizes.n_test, n_val=sizes.n_val, max_history=sizes.max_history,
            moods=moods, seed=settings.seed,
        )  # fmt: skip
        task = load_persona(settings.persona_dir, config, max_new_tokens=sizes.max_new_tokens)
    else:
        split = SplitConfig(
            min_items=max(settings.min_items or 20, sizes.n_test + sizes.n_val + 1),
            n_test=sizes.n_test,
            n_val=sizes.n_val,
            max_history=sizes.max_history,
            max_users=sizes.max_users,
            seed=settings.seed,
        )
        load = load_headlines if name == TaskName.HEADLINES else load_abstracts
        task = load(settings.data_file(name), split, sizes.max_new_tokens)
    return task.limit_test(settings.queries_per_user) if settings.queries_per_user else task


def task_runner(
    task: Task,
    *,
    model: LoadedModel,
    encoder: KeyEncoder,
    sites: tuple[Site, ...],
    options: GenerationOptions,
    settings: BenchSettings,
) -> Runner:
    """A runner over a fresh context for ``task``, caching under the settings' cache."""
    ctx = BenchContext(model, encoder, task, sites, settings.cache_dir, seed=settings.seed)
    return Runner(ctx, options, settings.cache_dir, batch_size=settings.batch_size)


def search_space(
    task: str, preset: Preset, layers: tuple[int, ...], settings: BenchSettings
) -> SearchSpace:
    """What the validation search tries on ``task``: the task's default K first."""
    top_k = default_top_k(task)
    return SearchSpace(
        layers=layers,
        strengths=preset.strengths,
        absolute_strengths=preset.absolute_strengths,
        components=preset.components,
        top_k=(top_k, *(k for k in preset.top_ks if k != top_k)),
        aggregations=preset.aggregations,
        taus=preset.taus,
        icl_k=preset.icl_k,
        contrasts=preset.contrasts,
        rounds=settings.search_rounds,
        margin=settings.search_margin,
    )


def benchmark_task(
    task: Task,
    model: LoadedModel,
    encoder: KeyEncoder,
    layers: tuple[int, ...],
    settings: BenchSettings,
) -> TaskReport:
    """Search on validation (where a row steers), run the test rows and the analyses."""
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    preset = settings.search_preset()
    sites = benchmark_sites(model.num_layers, layers)
    options = GenerationOptions(max_new_tokens=task.max_new_tokens)
    runner_for = partial(
        task_runner, model=model, encoder=encoder, sites=sites, options=options, settings=settings
    )
    runner = runner_for(task)
    ctx = runner.ctx
    judge = build_judge(task, settings.seed)
    space = search_space(task.name, preset, layers, settings)
    selection = Selection(default_fints(space), None, [])
    fixed = default_method_rows(preset.default_methods, model.num_layers)
    if steers(rows_for_test(selection, preset, settings.rows, fixed)):
        t = time.perf_counter()
        selection = select_fints(runner, space, judge)
        seconds["validation search"] = time.perf_counter() - t
    specs = rows_for_test(selection, preset, settings.rows, fixed)
    t = time.perf_counter()
    rows = evaluate(runner, specs, judge)
    seconds["test methods"] = time.perf_counter() - t
    steered = steers(specs)  # no search, diagnostics or sweep without a searched row
    report = TaskReport(
        name=task.name,
        judge_name=judge_name(task.name),
        source=task.source,
        sha256=task.sha256,
        users=len(task.users),
        test_queries=len(task.queries(Split.TEST)),
        validation_queries=len(task.queries(Split.VALIDATION)),
        max_new_tokens=task.max_new_tokens,
        rows=rows,
        chosen=selection.best.describe() if steered else "",
        selection_log=selection.log,
        selection_kept=selection.kept,
    )
    if settings.timing_repeats:
        timed_labels = (Label.NONE, Label.icl(REFERENCE_ICL_K), report.best_label)
        report.latency = measure_latency(
            ctx,
            [s for s in specs if s.label in timed_labels],
            options,
            batch_size=settings.batch_size,
            repeats=settings.timing_repeats,
        )
    if steered:
        report.diagnostics = diagnostics(ctx, selection.best)
    if preset.clusters:
        report.clusters = clusters(ctx, rows, preset.clusters, settings.seed)
    persona = task.name == TaskName.PERSONA
    fractions = () if persona else preset.sparsity
    sizes = preset.persona_sizes if persona else ()
    if (fractions or sizes) and steered:  # the sweep varies the chosen Fints
        t = time.perf_counter()
        best = selection.best.with_(label=Label.BEST)
        report.sparsity = sparsity(task, best, judge, runner_for, fractions=fractions, sizes=sizes)
        seconds["sparsity"] = time.perf_counter() - t
    seconds["extraction (inside the above)"] = ctx.extraction_seconds
    seconds["total"] = time.perf_counter() - started
    report.seconds = seconds
    return report


def run_benchmark(settings: BenchSettings) -> Path:
    """The whole run; progress on stderr, each task's tables on stdout. Returns results.md."""
    settings.check_data()  # before minutes of model loading
    from fints.encoders import SentenceTransformerEncoder
    from fints.models import load_model

    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    loaded = load_model(settings.model, dtype=settings.dtype)
    encoder = SentenceTransformerEncoder()
    layers = settings.layers or tuple(sorted({loaded.num_layers // 3, loaded.num_layers // 2}))
    reports = []
    for name in settings.tasks:
        task = load_task(name, settings)
        print(
            f"[{name}] {len(task.users)} users, {len(task.queries(Split.TEST))} test / "
            f"{len(task.queries(Split.VALIDATION))} validation queries",
            file=sys.stderr,
        )
        report = benchmark_task(task, loaded, encoder, layers, settings)
        reports.append(report)
        print(task_markdown(report))
    header = {
        "command": command_line(),
        "model": f"{loaded.name} (fingerprint {loaded.fingerprint[:12]}, dtype {loaded.dtype})",
        "seed": settings.seed,
        "preset": settings.preset,
        "layers searched": layers_searched(reports, layers),
        "data sha256": "; ".join(f"{r.name}: {r.sha256}" for r in reports),
        "machine": f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}",
        "wall time": f"{time.perf_counter() - started:.0f} s",
    }
    out = settings.out_dir(loaded.name)
    md = write_report(out, reports, header)
    (out / SETTINGS_FILE).write_text(json.dumps(settings.to_dict(), indent=1) + "\n")
    print(f"results written to {md}", file=sys.stderr)
    return md


def layers_searched(reports: list[TaskReport], layers: tuple[int, ...]) -> str:
    """The header's line: a probe-only run (no row steers) searches no layer."""
    if any(r.selection_log for r in reports):
        return ", ".join(map(str, layers))
    return "none (no row steers)"


def command_line(argv: list[str] | None = None) -> str:
    """How this run was started, as the header records it."""
    argv = sys.argv if argv is None else argv
    args = " ".join(map(shlex.quote, argv[1:]))
    if argv[0].endswith("commands.py"):
        return f"python -m fints.benchmark.commands {args}"
    if "bench" in argv[1:2]:
        return f"fints {args}"
    return " ".join(map(shlex.quote, argv))
