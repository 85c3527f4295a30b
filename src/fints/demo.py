"""`fints demo`: four users with clearly different styles, on the embedded default model.

For each new question it shows the unsteered answer beside each user's
personalized answers (steering alone, and steering with the user's own
examples retrieved into the prompt), all users decoded in one batch.
"""

from __future__ import annotations

import json
import tempfile
import time
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fints.engine import GenerationRequest, Personalizer
from fints.extraction import ExtractionConfig
from fints.generation import GenerationOptions
from fints.history import read_history
from fints.models import load_model
from fints.sites import parse_sites
from fints.steering import SteeringConfig
from fints.store import Store

DEMO_USERS = ("captain_reed", "prof_lindqvist", "zoe", "haiku_kim")
DEMO_SITES = "15.attn+mlp"
DEMO_STEERING = SteeringConfig(
    relative=True, strengths={"attn": 0.5, "mlp": 0.5}, top_k=5, aggregation="mean"
)


def demo_data_dir() -> Path:
    return Path(str(resources.files("fints") / "demo_data"))


def run_demo(
    model_name: str | None = None,
    *,
    max_new_tokens: int = 40,
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
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "demo.sqlite") as store:
        engine = Personalizer(
            model,
            store,
            steering=DEMO_STEERING,
            extraction=ExtractionConfig(sites=parse_sites(DEMO_SITES)),
        )
        histories = {u: read_history(data / f"{u}.jsonl") for u in DEMO_USERS}
        for user, items in histories.items():
            store.add_items("default", user, items)
        t0 = time.perf_counter()
        for user in DEMO_USERS:
            engine.build(user, progress=True)
        console.print(
            f"built {len(DEMO_USERS)} steering dictionaries at sites {DEMO_SITES} "
            f"in {time.perf_counter() - t0:.1f} s"
        )
        options = GenerationOptions(max_new_tokens=max_new_tokens)
        settings = {
            "unsteered": DEMO_STEERING.with_(enabled=False),
            "fints (steering)": DEMO_STEERING,
            "fints + own examples": DEMO_STEERING.with_(icl_k=2),
        }
        rows: list[dict[str, str]] = []
        for query in queries:
            outputs = {
                label: engine.generate(
                    [GenerationRequest(u, query, steering=config) for u in DEMO_USERS], options
                )
                for label, config in settings.items()
            }
            table = Table(title=f"[bold]{query}", show_lines=True, expand=True)
            table.add_column("user (history)", style="bold", no_wrap=True)
            for label in settings:
                table.add_column(label, ratio=1)
            for n, user in enumerate(DEMO_USERS):
                row = {"query": query, "user": user, "history": str(len(histories[user]))}
                row |= {label: outputs[label][n].text for label in settings}
                rows.append(row)
                table.add_row(
                    f"{user}\n({len(histories[user])} items)", *(row[label] for label in settings)
                )
            console.print(table)
    console.print(
        f"done in {time.perf_counter() - started:.1f} s. Steering adds each user's retrieved "
        "vectors at the attention and MLP outputs of one layer; the model's weights never change."
    )
    return rows
