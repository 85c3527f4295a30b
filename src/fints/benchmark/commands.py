"""``fints bench``: the real-data benchmark, as one typer-compatible function.

Register it with ``app.command("bench")(bench)``. ``--preset small`` is what
``make bench`` runs (a few users, every task, the main methods and controls);
``--preset full`` is the recorded run. Every option overrides the preset. The
options become a :class:`~fints.benchmark.settings.BenchSettings`, which
:func:`~fints.benchmark.pipeline.run_benchmark` runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fints.benchmark.labels import COMPONENTS, Label
from fints.benchmark.methods import ALL_ENTRIES
from fints.benchmark.presets import DEFAULT_PRESET
from fints.benchmark.settings import BenchSettings, flag
from fints.benchmark.tasks import DATA_DIR_ENV
from fints.errors import FintsError, InvalidInputError
from fints.extraction import method_names


def parse_items(text: str | None) -> tuple[str, ...] | None:
    """The non-empty entries of a comma-separated option, stripped (None: not given)."""
    return None if text is None else tuple(x.strip() for x in text.split(",") if x.strip())


def parse_methods(text: str | None) -> tuple[str, ...] | None:
    """``--default-methods``: names, or ``none`` (no such rows)."""
    values = parse_items(text)
    return () if values in (("none",), ()) else values


def parse_floats(text: str | None, name: str) -> tuple[float, ...] | None:
    values = parse_items(text)
    try:
        return None if values is None else tuple(float(x) for x in values)
    except ValueError:
        raise InvalidInputError(
            f"{flag(name)} must be comma-separated numbers, got {text!r}"
        ) from None


def parse_ints(text: str | None, name: str) -> tuple[int, ...] | None:
    values = parse_floats(text, name)
    return None if values is None else tuple(int(v) for v in values)


def parse_top_ks(text: str | None) -> tuple[int, ...] | None:
    """``--top-ks``: positive integers, or ``all`` for the whole dictionary."""
    values = parse_items(text)
    if values is None:
        return None
    if not all(v == "all" or (v.isdigit() and int(v) >= 1) for v in values):
        raise InvalidInputError(f"--top-ks takes positive integers or 'all', got {text!r}")
    return tuple(ALL_ENTRIES if v == "all" else int(v) for v in values)


def parse_rows(text: str | None) -> tuple[str, ...] | None:
    """``--rows``: labels, each stripped (an empty one is an unknown row)."""
    return None if text is None else tuple(r.strip() for r in text.split(","))


_EXAMPLE_ROWS = f"{Label.NONE},{Label.icl(3)},{Label.wrong_user_icl(3)}"


def bench(
    preset: Annotated[
        str, typer.Option(help="small (make bench), medium (the recorded CPU run) or full")
    ] = DEFAULT_PRESET,
    tasks: Annotated[str, typer.Option(help="comma-separated: headlines,abstracts,persona")] = (
        "headlines,abstracts,persona"
    ),
    model: Annotated[
        str | None, typer.Option(help="HF id, folder or .gguf (default: embedded SmolLM2)")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="folder with the JSONL data (headlines and abstracts; persona needs none)",
            envvar=DATA_DIR_ENV,
        ),
    ] = None,
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
        str | None, typer.Option(help=f"site components to search: {','.join(COMPONENTS)}")
    ] = None,
    contrasts: Annotated[
        str | None, typer.Option(help=f"contrasts to search: {','.join(method_names())}")
    ] = None,
    default_methods: Annotated[
        str | None,
        typer.Option(
            help="extraction methods run at their own defaults (sites, settings, steering), "
            "with their controls, beside the searched Fints: trained (the preset's) or 'none'"
        ),
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
            f"'{_EXAMPLE_ROWS}' (no steering row: no search)",
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
    from fints.benchmark.pipeline import run_benchmark

    try:
        settings = BenchSettings(
            preset=preset,
            tasks=parse_items(tasks) or (),
            model=model,
            data_dir=data_dir,
            headlines_file=headlines_file,
            abstracts_file=abstracts_file,
            persona_dir=persona_dir,
            out=out,
            cache=cache,
            layers=parse_ints(layers, "layers"),
            max_users=max_users,
            n_test=n_test,
            n_val=n_val,
            max_history=max_history,
            max_new_tokens=max_new_tokens,
            min_items=min_items,
            queries_per_user=queries_per_user,
            strengths=parse_floats(strengths, "strengths"),
            components=parse_items(components),
            contrasts=parse_items(contrasts),
            default_methods=parse_methods(default_methods),
            top_ks=parse_top_ks(top_ks),
            taus=parse_floats(taus, "taus"),
            search_rounds=search_rounds,
            search_margin=search_margin,
            rows=parse_rows(rows),
            sparsity_fractions=parse_floats(sparsity_fractions, "sparsity_fractions"),
            persona_sizes=parse_ints(persona_sizes, "persona_sizes"),
            n_clusters=n_clusters,
            batch_size=batch_size,
            timing_repeats=timing_repeats,
            dtype=dtype,
            seed=seed,
        )
        run_benchmark(settings)
    except FintsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def main() -> None:  # python -m fints.benchmark.commands
    typer.run(bench)


if __name__ == "__main__":
    main()
