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
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from fints.benchmark.commands import PRESETS, load_task, task_runner
from fints.benchmark.methods import DEFAULT_TAU, MethodSpec, benchmark_sites
from fints.benchmark.runner import Row, build_judge, compare, evaluate
from fints.benchmark.tasks import DEFAULT_DATA_DIR
from fints.generation import GenerationOptions
from fints.paths import fints_home


def specs_for(setting: MethodSpec) -> list[MethodSpec]:
    """The setting, its controls and centered twins, and the unsteered rows."""
    centered = setting.with_(label="centered", centered=True)
    rows = [
        MethodSpec("none", role="baseline"),
        setting,
        setting.with_(label="random direction", vector_source="random", role="control"),
        setting.with_(label="wrong-user dictionary", vector_source="wrong", role="control"),
        centered,
        centered.with_(label="centered, wrong-user dictionary", vector_source="wrong"),
    ]
    if setting.icl_k:
        rows.insert(1, MethodSpec(f"icl k={setting.icl_k}", kind="icl", icl_k=setting.icl_k))
    return rows


def markdown(rows: list[Row], judge: str, header: list[str]) -> str:
    setting = next(r for r in rows if r.role == "fints")
    lines = [*header, "", f"| row | setting | ROUGE-1 | ROUGE-L | {judge} | words |"]
    lines.append("|---|---|---|---|---|---|")
    for row in rows:
        s = row.summary()
        lines.append(
            f"| {row.label} | {row.description} | {s['rouge1']:.4f} | {s['rougeL']:.4f} | "
            f"{s['judge']:.3f} | {row.style.words:.1f} |"
        )
    lines += ["", f"Paired differences (95% bootstrap CI), {len(setting.texts)} queries:", ""]
    lines += [f"| row | minus | ΔROUGE-1 | ΔROUGE-L | Δ{judge} |", "|---|---|---|---|---|"]
    by_label = {r.label: r for r in rows}
    pairs = [(setting.label, r.label) for r in rows if r is not setting and r.label != "centered"]
    pairs.append(("centered", "centered, wrong-user dictionary"))
    for a, b in pairs:
        cells = " | ".join(
            str(compare(by_label[a], by_label[b], m)) for m in ("rouge1", "rougeL", "judge")
        )
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

    loaded = load_model(model, dtype=dtype)
    overrides = {
        "n_test": n_test, "n_val": n_val, "max_history": max_history,
        "max_users": max_users, "max_new_tokens": max_new_tokens,
    }  # fmt: skip
    bench_task = load_task(task, PRESETS["full"], DEFAULT_DATA_DIR, seed, overrides)
    if queries_per_user:
        bench_task = bench_task.limit_test(queries_per_user)
    chosen_layers = tuple(int(x) for x in layers.split(","))
    runner = task_runner(
        bench_task,
        loaded,
        SentenceTransformerEncoder(),
        benchmark_sites(loaded.num_layers, chosen_layers),
        GenerationOptions(max_new_tokens=bench_task.max_new_tokens),
        {"cache": fints_home() / "bench", "seed": seed, "batch_size": batch_size},
    )
    setting = MethodSpec(
        "setting",
        kind="fints",
        icl_k=icl_k,
        sites=sites,
        strength=strength,
        relative=not absolute,
        top_k=top_k,
        aggregation=aggregation,  # type: ignore[arg-type]
        tau=tau,
        contrast=contrast,  # type: ignore[arg-type]
        role="fints",
    )
    rows = evaluate(runner, specs_for(setting), build_judge(bench_task, seed))
    judge = "mood rate" if task == "persona" else "attribution"
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
