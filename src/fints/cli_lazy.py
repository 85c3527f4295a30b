"""Sub-commands of ``fints`` that live in heavy modules (the server, the benchmark):
listed by ``fints --help`` by name and short help, imported only when one of them is
run or asked for its own ``--help``."""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple

import typer
from typer.core import TyperCommand, TyperGroup


class LazyCommand(NamedTuple):
    """A command whose typer function lives in a heavy module, imported when run."""

    module: str
    function: str
    short_help: str  # the first line of the function's docstring (a test keeps them equal)


#: Listed by ``fints --help`` without importing their modules.
LAZY_COMMANDS: dict[str, LazyCommand] = {
    "serve": LazyCommand(
        "fints.serving.commands",
        "serve",
        "Serve personalized generations over an OpenAI-compatible HTTP API.",
    ),
    "loadtest": LazyCommand(
        "fints.serving.commands",
        "loadtest",
        "A bounded load benchmark: latency, throughput, batching and steering cost.",
    ),
    "bench": LazyCommand(
        "fints.benchmark.commands",
        "bench",
        "Benchmark personalization methods and controls on real per-user data.",
    ),
}


def load_lazy_command(name: str) -> Any:
    """The click command of a lazy command: its module is imported here."""
    spec = LAZY_COMMANDS[name]
    function = getattr(importlib.import_module(spec.module), spec.function)
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command(name=name, help=function.__doc__)(function)
    command = typer.main.get_command(single)
    command.name = name
    return command


class _StandIn(TyperCommand):
    """A lazy command in the listing (name and short help); never run itself."""


class LazyGroup(TyperGroup):
    """Lists the lazy commands by stand-ins; the real command replaces its stand-in when it is
    resolved to be run or to show its own help. (Click's types are written ``Any`` here: some
    typer versions vendor their own click.)"""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name, spec in LAZY_COMMANDS.items():
            stand_in = _StandIn(name, help=spec.short_help, short_help=spec.short_help)
            self.commands.setdefault(name, stand_in)

    def resolve_command(self, ctx: Any, args: list[str]) -> tuple[str | None, Any, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        if name is not None and isinstance(command, _StandIn):
            command = self.commands[name] = load_lazy_command(name)
        return name, command, rest
