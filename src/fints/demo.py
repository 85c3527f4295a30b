"""`fints demo`: four users with clearly different styles, on the embedded default model.

Each user's steering vectors are trained on their own history through the product's
path (a :class:`Personalizer` with the ``trained`` extraction method). For each new
question the demo shows the unsteered answer beside each user's personalized answers
(steering alone, with no examples in the prompt, and steering with the user's own
examples retrieved into the prompt), every user and setting decoded in one batch; then
a judge fitted on the users' histories says whose style each answer is in.
"""

from __future__ import annotations

import json
import tempfile
import time
from importlib import resources
from pathlib import Path

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from fints.demo_judge import AuthorJudge
from fints.engine import GenerationRequest, Personalizer
from fints.extraction import ExtractionConfig
from fints.generation import GenerationOptions
from fints.history import HistoryItem, read_history
from fints.models import load_model
from fints.sites import parse_sites
from fints.steering import SteeringConfig
from fints.store import Store

DEMO_USERS = ("captain_reed", "prof_lindqvist", "zoe", "haiku_kim")
DEMO_SITES = "20.block,24.block"
# Per-user vectors trained on the first 24 tokens of each of the user's 10 answers: 12
# Adam steps at lr 1.0, no shared part and no L2 (four very different users share
# little: a pull towards a tenant vector blurs them), no held-out items (ten is few).
# Measured on 10 held-out questions: the judge below names the right user for 93% of
# the answers (unsteered: 25%); README.md, "make demo", lists the settings compared.
DEMO_TRAINING: dict[str, object] = {
    "shared_steps": 0,
    "steps": 12,
    "lr": 1.0,
    "l2": 0.0,
    "valid_fraction": 0.0,
    "patience": None,
    "max_target_tokens": 24,
}
DEMO_EXTRACTION = ExtractionConfig(
    sites=parse_sites(DEMO_SITES), method="trained", params=DEMO_TRAINING
)
# Trained vectors are added as trained: absolute strength 1, and every entry of a user's
# dictionary holds the same user vector, so the mean of the retrieved ones is that vector.
DEMO_STEERING = SteeringConfig(relative=False, strengths={"block": 1.0}, aggregation="mean")
STEERED = "steering alone (trained)"  # no examples in the prompt
COLUMNS = {
    "unsteered": DEMO_STEERING.with_(enabled=False),
    STEERED: DEMO_STEERING,
    "fints + own examples": DEMO_STEERING.with_(icl_k=2),  # steering + 2 retrieved items
}


def demo_data_dir() -> Path:
    return Path(str(resources.files("fints") / "demo_data"))


def run_demo(
    model_name: str | None = None,
    *,
    max_new_tokens: int = 40,
    repetition_penalty: float = 1.2,
    console: Console | None = None,
) -> list[dict[str, str]]:
    """Run the demo; returns the rows it printed (for tests)."""
    console = console or Console()
    started = time.perf_counter()
    console.rule("[bold]fints demo: one model, four users, no fine-tuning")
    with console.status("loading the model (the first run converts the GGUF once, ~25 s)"):
        model = load_model(model_name)
    dtype = str(model.dtype).removeprefix("torch.")
    console.print(
        f"model [bold]{model.name}[/] ({model.num_layers} layers, d={model.hidden_size}, "
        f"{dtype}) loaded in {time.perf_counter() - started:.1f} s"
    )
    data = demo_data_dir()
    queries: list[str] = json.loads((data / "queries.json").read_text())
    histories = {u: read_history(data / f"{u}.jsonl") for u in DEMO_USERS}
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "demo.sqlite") as store:
        engine = Personalizer(model, store, steering=DEMO_STEERING, extraction=DEMO_EXTRACTION)
        for user, items in histories.items():
            store.add_items("default", user, items)
        _train(engine, histories, console)
        # greedy, with a mild repetition penalty: a 135M model loops without one
        options = GenerationOptions(
            max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty
        )
        rows: list[dict[str, str]] = []
        for query in queries:
            requests = [
                GenerationRequest(u, query, steering=config)
                for config in COLUMNS.values()
                for u in DEMO_USERS
            ]
            with console.status(f"answering {query!r} for every user and column in one batch"):
                outputs = iter(engine.generate(requests, options))
            answers = {label: [next(outputs).text for _ in DEMO_USERS] for label in COLUMNS}
            table = Table(title=f"[bold]{query}", show_lines=True, expand=True)
            table.add_column("user (history)", style="bold", no_wrap=True)
            for label in COLUMNS:
                table.add_column(label, ratio=1)
            for n, user in enumerate(DEMO_USERS):
                row = {"query": query, "user": user, "history": str(len(histories[user]))}
                row |= {label: answers[label][n] for label in COLUMNS}
                rows.append(row)
                table.add_row(
                    f"{user}\n({len(histories[user])} items)", *(row[label] for label in COLUMNS)
                )
            console.print(table)
    _judge(histories, rows, console)
    layers = " and ".join(str(site.layer) for site in DEMO_EXTRACTION.sites)
    console.print(
        f"done in {time.perf_counter() - started:.1f} s. Each user's trained vectors are "
        f"added to the residual stream after layers {layers};\n"
        "the model's weights never change."
    )
    return rows


def _train(engine: Personalizer, histories: dict[str, list[HistoryItem]], console: Console) -> None:
    """Train every user's vectors through the engine, with a progress bar and a timing line."""
    t0 = time.perf_counter()
    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("training steering vectors", total=len(histories))
        for user in histories:
            progress.update(task, description=f"training {user}'s steering vectors")
            engine.build(user, progress=False)
            progress.advance(task)
    steps = DEMO_TRAINING["steps"]
    console.print(
        f"trained {len(histories)} users' steering vectors ({steps} Adam steps on each "
        f"user's {len(next(iter(histories.values())))} answers, sites {DEMO_SITES}) "
        f"in {time.perf_counter() - t0:.1f} s"
    )


def _judge(
    histories: dict[str, list[HistoryItem]], rows: list[dict[str, str]], console: Console
) -> None:
    """Per column, how many answers a judge fitted on the histories gives to their own user;
    each row gets the judge's verdict per column (``judged <column>``)."""
    judge = AuthorJudge(histories)
    table = Table(
        title="[bold]whose style is it?[/] A TF-IDF judge fitted on the users' history "
        "answers names each answer's author",
        caption=f"users right: most of the user's answers judged theirs. Chance: 1 in "
        f"{len(histories)} (the unsteered answer is the same for every user)",
        box=box.SIMPLE,
    )
    table.add_column("column", no_wrap=True)
    table.add_column("answers right", justify="right")
    table.add_column("users right", justify="right")
    for user in histories:
        table.add_column(user, justify="right")
    for label in COLUMNS:
        verdicts = judge.predict([r[label] for r in rows])
        for row, verdict in zip(rows, verdicts, strict=True):
            row[f"judged {label}"] = verdict
        result = judge.attribution([(r["user"], r[label]) for r in rows])
        hits, answers = result.total
        table.add_row(
            label,
            f"{hits}/{answers}",
            f"{result.users_right()}/{len(histories)}",
            *(f"{result.hits[u]}/{result.answers[u]}" for u in histories),
        )
    console.print(table)
