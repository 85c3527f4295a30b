"""Work in steps: a generator that yields between bounded pieces of work.

Long model work (training a tenant's shared vector takes minutes on a CPU) is written as
a generator that ``yield``\\ s after each bounded piece (an optimizer step, a forward
pass over a few examples) and returns its result. The library runs it to the end in one
go (:func:`run_to_end`); the server runs one piece at a time on its model thread and
decodes other requests between pieces, so no write holds the model for more than a
piece. A generator must leave no hooks installed and no grad mode changed across a
``yield``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, TypeVar

T = TypeVar("T")

#: Work in steps: each ``next()`` runs one bounded piece; the return value is the result.
Steps = Generator[None, None, T]


def run_to_end(steps: Steps[T]) -> T:
    """Run every piece now; return the result."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def one_step(fn: Callable[[], T]) -> Steps[T]:
    """Work of one piece: ``fn``."""
    return fn()
    yield  # a generator: the body runs at the first next()


def advance(steps: Steps[Any]) -> tuple[bool, Any]:
    """One piece: ``(done, result)``. (A StopIteration cannot cross a future.)"""
    try:
        next(steps)
    except StopIteration as stop:
        return True, stop.value
    return False, None
