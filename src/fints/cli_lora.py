"""``fints lora ...``: train, inspect, import and delete LoRA adapters (PEFT) per tenant
and user. Heavy modules (torch, transformers, peft) are imported by the commands."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fints.cli_errors import clear_errors

lora_app = typer.Typer(
    help="Per-user and task LoRA adapters (PEFT): OPPU, and steering on top.",
    no_args_is_help=True,
)
console = Console()

StoreOpt = Annotated[
    Path | None, typer.Option("--store", help="SQLite store (default $FINTS_HOME/store.sqlite)")
]
ModelOpt = Annotated[str | None, typer.Option("--model", help="the base model (default smollm2)")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto, bfloat16, float32, float16")]
TenantOpt = Annotated[str, typer.Option("--tenant", help="tenant namespace")]
TemplateOpt = Annotated[str, typer.Option("--template", help="generic, headline or abstract")]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="JSON file of LoRA settings (LoraTrainConfig)")
]
RankOpt = Annotated[int | None, typer.Option("--r", help="LoRA rank (default 8)")]
AlphaOpt = Annotated[int | None, typer.Option("--alpha", help="LoRA alpha (default 8)")]
EpochsOpt = Annotated[int | None, typer.Option("--epochs", help="passes over the history (2)")]
LrOpt = Annotated[float | None, typer.Option("--lr", help="learning rate (default 1e-4)")]


@contextmanager
def _job(
    store: Path | None, model: str | None, dtype: str, tenant: str, template: str, config: Any
) -> Iterator[Any]:
    from fints.adapters.jobs import Job
    from fints.models import load_model
    from fints.paths import default_store_path
    from fints.prompts import get_template
    from fints.store import Store

    with Store(store or default_store_path()) as db:
        with console.status(f"loading model {model or 'smollm2'}"):
            loaded = load_model(model, dtype=dtype)
        yield Job(loaded, db, get_template(template), config, tenant)


def _config(path: Path | None, **flags: Any) -> Any:
    from fints.adapters.config import LoraTrainConfig
    from fints.errors import InvalidInputError

    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidInputError(f"--config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInputError(f"--config {path}: expected a JSON object")
    data |= {k: v for k, v in flags.items() if v is not None}
    return LoraTrainConfig.from_dict(data)


@contextmanager
def _progress() -> Iterator[Progress]:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TextColumn("{task.fields[loss]}"), TimeElapsedColumn()) as bar:
        yield bar


@lora_app.command("train-task")
@clear_errors
def train_task(
    task: Annotated[str, typer.Argument(help="the task adapter's name, e.g. headlines")],
    users: Annotated[list[str] | None, typer.Option("--user", help="only these users")] = None,
    store: StoreOpt = None,
    model: ModelOpt = None,
    dtype: DtypeOpt = "auto",
    tenant: TenantOpt = "default",
    template: TemplateOpt = "generic",
    config: ConfigOpt = None,
    r: RankOpt = None,
    alpha: AlphaOpt = None,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
) -> None:
    """Train the tenant's task LoRA on all (or some) users' histories."""
    from fints.adapters.jobs import train_task as run

    settings = _config(config, r=r, alpha=alpha, epochs=epochs, lr=lr)
    with _job(store, model, dtype, tenant, template, settings) as job, _progress() as bar:
        steps = bar.add_task(f"task {task}", total=None, loss="")
        stored = run(
            job,
            task,
            users,
            on_step=lambda _n, loss: bar.update(steps, advance=1, loss=f"loss {loss:.3f}"),
        )
    console.print(
        f"task adapter {task!r}: {stored.meta.items} items, {stored.meta.train_seconds:.1f} s, "
        f"{stored.bytes} bytes in {stored.folder}"
    )


@lora_app.command("train")
@clear_errors
def train(
    users: Annotated[list[str] | None, typer.Argument(help="users (default: all)")] = None,
    task: Annotated[
        str | None, typer.Option("--task", help="train on top of this task adapter (OPPU)")
    ] = None,
    store: StoreOpt = None,
    model: ModelOpt = None,
    dtype: DtypeOpt = "auto",
    tenant: TenantOpt = "default",
    template: TemplateOpt = "generic",
    config: ConfigOpt = None,
    r: RankOpt = None,
    alpha: AlphaOpt = None,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
) -> None:
    """Train each user's LoRA on their own history (on top of --task if given)."""
    from fints.adapters.jobs import train_users

    settings = _config(config, r=r, alpha=alpha, epochs=epochs, lr=lr)
    with _job(store, model, dtype, tenant, template, settings) as job, _progress() as bar:
        chosen = list(users) if users else job.store.users(tenant)
        overall = bar.add_task("users", total=len(chosen), loss="")
        steps = bar.add_task("", total=None, loss="")

        def on_user(user: str, total: int) -> None:
            if bar.tasks[steps].description:
                bar.advance(overall)
            bar.reset(steps, total=total, description=f"  {user}", loss="")

        done = train_users(
            job,
            chosen,
            task,
            on_user=on_user,
            on_step=lambda _n, loss: bar.update(steps, advance=1, loss=f"loss {loss:.3f}"),
        )
        bar.advance(overall)
    table = Table("user", "items", "seconds", "final loss", "bytes")
    for d in done:
        table.add_row(
            d.user,
            str(d.trained.items),
            f"{d.trained.seconds:.1f}",
            f"{d.trained.epoch_losses[-1]:.3f}",
            str(d.stored.bytes),
        )
    console.print(table)


@lora_app.command("show")
@clear_errors
def show(
    user: Annotated[str, typer.Argument(help="user name")],
    store: StoreOpt = None,
    model: ModelOpt = None,
    dtype: DtypeOpt = "auto",
    tenant: TenantOpt = "default",
) -> None:
    """What USER's adapter for this model records (JSON)."""
    with _job(store, model, dtype, tenant, "generic", None) as job:
        stored = job.adapters.require_user_adapter(tenant, user)
        console.print_json(json.dumps({**stored.meta.to_json(), "folder": str(stored.folder)}))


@lora_app.command("import")
@clear_errors
def import_(
    folder: Annotated[Path, typer.Argument(help="an adapter folder written by fints")],
    user: Annotated[str, typer.Argument(help="the user it becomes theirs")],
    store: StoreOpt = None,
    model: ModelOpt = None,
    dtype: DtypeOpt = "auto",
    tenant: TenantOpt = "default",
) -> None:
    """Store an adapter as USER's, after checking all of it (nothing stored on failure)."""
    with _job(store, model, dtype, tenant, "generic", None) as job:
        stored = job.adapters.import_user(folder, tenant, user)
    console.print(f"imported the adapter as {user!r} ({stored.bytes} bytes)")


@lora_app.command("delete")
@clear_errors
def delete(
    user: Annotated[str, typer.Argument(help="user name")],
    store: StoreOpt = None,
    model: ModelOpt = None,
    dtype: DtypeOpt = "auto",
    tenant: TenantOpt = "default",
) -> None:
    """Delete USER's adapter for this model (their history and dictionary stay)."""
    with _job(store, model, dtype, tenant, "generic", None) as job:
        if not job.adapters.delete_user_adapter(tenant, user):
            console.print(f"{user!r} has no adapter for this model")
            raise typer.Exit(1)
    console.print(f"deleted the adapter of {user!r}")
