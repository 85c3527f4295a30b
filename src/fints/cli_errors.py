"""How a CLI command ends on a fints error: its message on one line, exit status 1."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import typer
from rich.console import Console

F = TypeVar("F", bound=Callable[..., Any])


def clear_errors(func: F) -> F:
    """A fints error ends the command with its message on one line (exit 1)."""
    from fints.errors import FintsError

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except FintsError as exc:
            Console(stderr=True).print(f"[bold red]error:[/] {exc}", soft_wrap=True, markup=False)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]
