"""One Fints setting against its controls on a task's test queries.

The bench pairs controls (a random direction, another user's dictionary) with the
setting chosen on validation only. When a design variant stands out on test (a
site, say), this asks whether the user's own vectors are what makes it stand out:
it runs the setting, its random-direction and wrong-user-dictionary controls, its
centered twins and the unsteered rows on the same split as a bench run, reusing
that run's caches (pass the bench run's split options), and writes a Markdown
table with paired-bootstrap intervals and the first outputs of each row.

    .venv/bin/python benchmarks/setting_controls.py --task persona --layers 10,15,20 \\
        --sites 20.block --strength 2 --absolute --icl-k 3 --contrast response \\
        --dtype bfloat16 --out benchmarks/results/full-smollm2-persona/block_controls.md

Headlines and abstracts read their JSONL from ``--data-dir`` (or ``$FINTS_BENCH_DATA``).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from fints.benchmark.banks import benchmark_sites
from fints.benchmark.labels import METRICS, Kind, Label, Role, Source, judge_name
from fints.benchmark.methods import DEFAULT_TAU, MethodSpec
from fints.benchmark.pipeline import load_task, task_runner
from fints.benchmark.runner import Row, build_judge, compare, evaluate
from fints.benchmark.settings import BenchSettings
from fints.benchmark.tasks import DATA_DIR_ENV
from fints.errors import FintsError
from fints.generation import GenerationOptions

# This script's own row labels (its table, not the bench report's).
CENTERED = "centered"
CENTERED_WRONG_USER = "centered, wrong-user dictionary"


def specs_for(setting: MethodSpec) -> list[MethodSpec]:
    """The setting, its controls and centered twins, and the unsteered rows."""
    centered = setting.with_(label=CENTERED, centered=True)
    control = Role.CONTROL
    rows = [
        MethodSpec(Label.NONE, role=Role.BASELINE),
        setting,
        setting.with_(label="random direction", vector_source=Source.RANDOM, role=control),
        setting.with_(label="wrong-user dictionary", vector_source=Source.WRONG, role=control),
        centered,
        centered.with_(label=CENTERED_WRONG_USER, vector_source=Source.WRONG),
    ]
    if setting.icl_k:
        k = setting.icl_k
        rows.insert(1, MethodSpec(Label.icl(k), kind=Kind.ICL, icl_k=k))
    return rows


def markdown(rows: list[Row], judge: str, header: list[str]) -> str:
    setting = next(r for r in rows if r.role == Role.FINTS)
    lines = [*header, "", f"| row | setting | ROUGE-1 | ROUGE-L | {judge} | words |"]
    lines.append("|---|---|---|---|---|---|")
    for row in rows:
        r1, rl, hits = (row.summary()[m] for m in METRICS)
        lines.append(
            f"| {row.label} | {row.description} | {r1:.4f} | {rl:.4f} | "
            f"{hits:.3f} | {row.style.words:.1f} |"
        )
    lines += ["", f"Paired differences (95% bootstrap CI), {len(setting.texts)} queries:", ""]
    lines += [f"| row | minus | ΔROUGE-1 | ΔROUGE-L | Δ{judge} |", "|---|---|---|---|---|"]
    by_label = {r.label: r for r in rows}
    pairs = [(setting.label, r.label) for r in rows if r is not setting and r.label != CENTERED]
    pairs.append((CENTERED, CENTERED_WRONG_USER))
    for a, b in pairs:
        cells = " | ".join(str(compare(by_label[a], by_label[b], m)) for m in METRICS)
        lines.append(f"| {a} | {b} | {cells} |")
    lines += ["", "First three outputs of each row:", ""]
    for row in rows:
        lines.append(f"- **{row.label}**")
        lines += [f"  - {text[:160]!r}" for text in row.texts[:3]]
    return "\n".join(lines) + "\n"


def main(
    task: Annotated[str, typer.Option(help="headlines, abstracts or persona")],
    sites: Annotated[str, typer.Option(help="the setting's sites, e.g. 20.block")],
    strength: Annotated[float, typer.Option(help="the setting's strength")],
    out: Annotated[Path, typer.Option(help="Markdown file to write")],
    layers: Annotated[str, typer.Option(help="the bench run's --layers (cache key)")],
    data_dir: Annotated[
        Path | None,
        typer.Option(help="the bench run's --data-dir (not for persona)", envvar=DATA_DIR_ENV),
    ] = None,
    absolute: Annotated[bool, typer.Option(help="absolute (not norm-relative) strength")] = False,
    icl_k: Annotated[int, typer.Option(help="in-context items underneath")] = 0,
    contrast: Annotated[str, typer.Option(help="context or response")] = "context",
    aggregation: Annotated[str, typer.Option(help="attentive or mean")] = "attentive",
    top_k: Annotated[int, typer.Option(help="dictionary entries retrieved (0: all)")] = 5,
    tau: Annotated[float, typer.Option(help="attentive softmax temperature")] = DEFAULT_TAU,
    model: Annotated[str | None, typer.Option(help="model id, folder or GGUF")] = None,
    dtype: Annotated[str, typer.Option(help="the bench run's --dtype")] = "auto",
    n_test: Annotated[int | None, typer.Option(help="the bench run's --n-test")] = None,
    n_val: Annotated[int | None, typer.Option(help="the bench run's --n-val")] = None,
    max_history: Annotated[int | None, typer.Option(help="the bench run's --max-history")] = None,
    max_users: Annotated[int | None, typer.Option(help="the bench run's --max-users")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="the bench run's value")] = None,
    queries_per_user: Annotated[int, typer.Option(help="test queries kept per user")] = 0,
    batch_size: Annotated[int, typer.Option(help="generation batch size")] = 16,
    seed: int = 0,
) -> None:
    from fints.encoders import SentenceTransformerEncoder
    from fints.models import load_model

    try:
        settings = BenchSettings(
            preset="full", tasks=(task,), model=model, data_dir=data_dir, n_test=n_test,
            n_val=n_val, max_history=max_history, max_users=max_users,
            max_new_tokens=max_new_tokens, queries_per_user=queries_per_user,
            batch_size=batch_size, dtype=dtype, seed=seed,
        )  # fmt: skip
        settings.check_data()
    except FintsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    loaded = load_model(model, dtype=dtype)
    bench_task = load_task(task, settings)
    chosen_layers = tuple(int(x) for x in layers.split(","))
    runner = task_runner(
        bench_task,
        model=loaded,
        encoder=SentenceTransformerEncoder(),
        sites=benchmark_sites(loaded.num_layers, chosen_layers),
        options=GenerationOptions(max_new_tokens=bench_task.max_new_tokens),
        settings=settings,
    )
    setting = MethodSpec(
        "setting",
        kind=Kind.FINTS,
        icl_k=icl_k,
        sites=sites,
        strength=strength,
        relative=not absolute,
        top_k=top_k,
        aggregation=aggregation,  # type: ignore[arg-type]
        tau=tau,
        contrast=contrast,
        role=Role.FINTS,
    )
    rows = evaluate(runner, specs_for(setting), build_judge(bench_task, seed))
    judge = judge_name(task)
    header = [
        f"# {setting.describe()}: against its controls ({task})",
        "",
        f"`.venv/bin/python benchmarks/setting_controls.py {shlex.join(sys.argv[1:])}`",
        "",
        f"Model {loaded.name} ({loaded.dtype}), seed {seed}, {len(bench_task.users)} users.",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(rows, judge, header))
    typer.echo(out.read_text())


if __name__ == "__main__":
    typer.run(main)
