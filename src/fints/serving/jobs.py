"""What the model worker handles: a generation request (:class:`GenerationJob`, with the
events it answers with) and a write in steps (:class:`WriteJob`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fints.engine import GenerationRequest, GenerationResult
from fints.generation import GenerationOptions
from fints.steps import Steps

# -- events from the worker to one request --------------------------------------------------


@dataclass(frozen=True)
class Started:
    """The request's row is prepared (steering known) and decoding begins."""

    result: GenerationResult  # text still empty
    batch_size: int


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    result: GenerationResult
    batch_size: int


@dataclass(frozen=True)
class Failed:
    error: BaseException


Event = Started | Delta | Done | Failed


@dataclass
class GenerationJob:
    request: GenerationRequest
    options: GenerationOptions
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    enqueued_at: float = field(default_factory=time.perf_counter)
    abandoned: bool = False  # the client went away before the batch started
    answered: bool = False  # Done or Failed was emitted (set and read by the worker)
    on_finished: Callable[[], None] | None = None  # once, on the loop: answered or abandoned

    def emit(self, event: Event) -> None:
        """Thread-safe: called from the worker."""
        if isinstance(event, Done | Failed):
            self.answered = True
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening
            self.loop.call_soon_threadsafe(self._deliver, event)

    def _deliver(self, event: Event) -> None:
        """On the loop: a final event frees the job's slot before anyone can see it (so
        the client's next request finds the slot free)."""
        if isinstance(event, Done | Failed):
            self.finish()
        self.events.put_nowait(event)

    def finish(self) -> None:
        """On the loop: the job left the server (answered, or its client went away)."""
        callback, self.on_finished = self.on_finished, None
        if callback is not None:
            callback()

    async def next_event(self) -> Event:
        return await self.events.get()

    async def result(self) -> tuple[GenerationResult, int]:
        """Wait for the finished result (skipping stream events); raise its error."""
        while True:
            event = await self.events.get()
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Done):
                return event.result, event.batch_size


@dataclass
class WriteJob:
    steps: Steps[Any]  # a write: each piece runs on the model thread (fints.steps)
    future: asyncio.Future[Any]
    enqueued_at: float = field(default_factory=time.perf_counter)
