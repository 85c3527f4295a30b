"""Dynamic batching: many concurrent requests, one model, one worker thread.

Requests wait in an asyncio queue. A collector task takes the first one, waits a
few milliseconds for company (or not at all when the worker was busy and the
queue filled meanwhile), and hands up to ``max_batch_size`` requests to the
single worker thread that owns the model. The worker groups them by
:class:`GenerationOptions` and runs each group as one
:meth:`Personalizer.prepare` + :meth:`Personalizer.decode` (what
:meth:`Personalizer.generate` does), every row steered with its own user's vectors.

Writes (adding history with extraction, forgetting a user) run on the same
thread, one after another in arrival order, so extraction and generation never
share the model at once, and a write acknowledged to a client is visible to every
request sent after the acknowledgement. A write is a sequence of bounded steps
(storing the items, then extracting a few items at a time); between two steps the
worker decodes a batch of whatever generation requests wait, so decoding keeps
its share while a long write runs (generation first, then one write step).

Streaming: a :class:`~fints.serving.streaming.RowStreamer` hands every streaming
row its own text deltas, which reach the request through the row's asyncio queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TypeVar

from fints.engine import GenerationRequest, Personalizer, PreparedBatch
from fints.generation import GenerationOptions, eos_token_ids
from fints.serving.api_errors import ApiError
from fints.serving.guards import FiniteGuard, nonfinite_rows, overflow
from fints.serving.jobs import (
    Delta,
    Done,
    Failed,
    GenerationJob,
    Started,
    WriteJob,
    WriteSteps,
    advance,
    one_step,
)
from fints.serving.metrics import ServingMetrics
from fints.serving.streaming import RowStreamer

__all__ = [
    "Batcher",
    "Delta",
    "Done",
    "Failed",
    "GenerationJob",
    "Started",
    "WriteSteps",
    "nonfinite_rows",
]

log = logging.getLogger(__name__)
T = TypeVar("T")


# -- the batcher ------------------------------------------------------------------------


class Batcher:
    """The queues, the collector task and the one worker thread that owns the model."""

    def __init__(
        self,
        personalizer: Personalizer,
        metrics: ServingMetrics,
        *,
        max_batch_size: int = 8,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        max_prompt_tokens: int = 2048,
    ) -> None:
        if max_batch_size < 1 or max_wait_ms < 0 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_wait_ms >= 0")
        self.personalizer = personalizer
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.max_prompt_tokens = max_prompt_tokens
        self._eos = eos_token_ids(personalizer.model)
        self._jobs: deque[GenerationJob] = deque()  # generation requests, in arrival order
        self._writes: deque[WriteJob] = deque()  # writes waiting for the current one
        self._write: WriteJob | None = None  # the write in progress (between its steps)
        self._wake: asyncio.Event | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle (call from the server's event loop) --

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the batcher is already running")
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fints-model")
        self._task = asyncio.create_task(self._collect(), name="fints-batcher")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        assert self._executor is not None
        gone = ApiError(503, "the server is shutting down", type="server_error")
        while self._jobs:
            self._jobs.popleft().emit(Failed(gone))
        writes = [*([self._write] if self._write else []), *self._writes]
        self._write, self._writes = None, deque()
        for write in writes:
            if not write.future.done():
                write.future.set_exception(gone)
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)
        self._task = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def depth(self) -> int:
        """Requests and writes waiting (a write in progress counts until it is answered)."""
        return len(self._jobs) + len(self._writes) + (self._write is not None)

    # -- submitting --

    def submit(
        self,
        request: GenerationRequest,
        options: GenerationOptions,
        *,
        stream: bool,
        on_finished: Callable[[], None] | None = None,
    ) -> GenerationJob:
        """Queue a request; ``on_finished`` runs on the loop once it is answered or
        abandoned (not when this raises)."""
        job = GenerationJob(request, options, stream, asyncio.get_running_loop())
        self._admit()
        job.on_finished = on_finished
        self._jobs.append(job)
        self._woken()
        return job

    async def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the model thread, after the writes before it, as one step."""
        return await self.run_steps(one_step(fn))

    async def run_steps(self, steps: WriteSteps[T]) -> T:
        """Run a write of several steps on the model thread, after the writes before it;
        the worker decodes waiting requests between two steps. Returns its result."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._admit()
        self._writes.append(WriteJob(steps, future))
        self._woken()
        return await future

    def _admit(self) -> None:
        if self._wake is None or not self.running:
            raise ApiError(503, "the model worker is not running", type="server_error")
        if self.depth >= self.max_queue:
            raise ApiError(
                503,
                f"the server is overloaded ({self.max_queue} requests waiting, the limit "
                "max_queue); retry later",
                type="overloaded_error",
                param="max_queue",
                code="queue_full",
                headers={"retry-after": "1"},
            )

    def _woken(self) -> None:
        assert self._wake is not None
        self.metrics.queue_depth.set(self.depth)
        self._wake.set()

    # -- the collector task --

    async def _collect(self) -> None:
        """Generation first: a batch of the waiting requests, then one step of the current
        write, and again; so a long write delays a request by one step at most."""
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._jobs and self._write is None and not self._writes:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._jobs:
                batch = await self._next_batch()
                self.metrics.queue_depth.set(self.depth)
                await loop.run_in_executor(self._executor, self._run_batch, batch)
            if self._write is None and self._writes:
                self._write = self._writes.popleft()
            if self._write is not None:
                await self._step_write(loop, self._write)

    async def _next_batch(self) -> list[GenerationJob]:
        if self.max_wait and len(self._jobs) < self.max_batch_size:
            await asyncio.sleep(self.max_wait)  # a few ms for others to join
        batch: list[GenerationJob] = []
        while self._jobs and len(batch) < self.max_batch_size:
            batch.append(self._jobs.popleft())
        return batch

    async def _step_write(self, loop: asyncio.AbstractEventLoop, job: WriteJob) -> None:
        """One step of ``job``; answers it when it ends (returns or raises)."""
        began = time.perf_counter()
        try:
            done, value = await loop.run_in_executor(self._executor, advance, job.steps)
        except Exception as exc:
            self._write = None
            self.metrics.write_errors.inc()
            if not job.future.done():
                job.future.set_exception(exc)
            return
        finally:
            self.metrics.write_step_seconds.observe(time.perf_counter() - began)
        if done:
            self._write = None
            self.metrics.write_seconds.observe(time.perf_counter() - job.enqueued_at)
            if not job.future.done():
                job.future.set_result(value)
        self.metrics.queue_depth.set(self.depth)

    # -- the worker thread --

    def _run_batch(self, jobs: list[GenerationJob]) -> None:
        groups: dict[GenerationOptions, list[GenerationJob]] = {}
        for job in jobs:
            if not job.abandoned:
                groups.setdefault(job.options, []).append(job)
        for options, group in groups.items():
            try:
                self._run_group(options, group)
            except BaseException as exc:  # never let one batch take the worker down
                log.exception("batch of %d failed", len(group))
                for job in group:
                    if not job.answered:
                        self._fail(job, exc)

    def _fail(self, job: GenerationJob, error: BaseException) -> None:
        """Answer one request with ``error`` and count it."""
        self.metrics.generation_errors.inc()
        job.emit(Failed(error))

    def _prepare(
        self, jobs: list[GenerationJob]
    ) -> tuple[PreparedBatch | None, list[GenerationJob]]:
        """Prepare the batch; a row that cannot be prepared fails alone."""
        p = self.personalizer
        try:
            prepared = p.prepare([j.request for j in jobs])
        except Exception:
            kept = []
            for job in jobs:
                try:
                    p.prepare([job.request])
                    kept.append(job)
                except Exception as exc:
                    self._fail(job, exc)
            if not kept:
                return None, []
            jobs = kept
            prepared = p.prepare([j.request for j in jobs])
        refused: dict[int, ApiError] = {}
        for i, ids in enumerate(prepared.prompts):
            if len(ids) > self.max_prompt_tokens:
                refused[i] = ApiError(
                    400,
                    f"the prompt is {len(ids)} tokens long; this server "
                    f"accepts at most {self.max_prompt_tokens}",
                    param="messages" if not jobs[i].request.raw_prompt else "prompt",
                    code="context_length_exceeded",
                )
        for i, sites in nonfinite_rows(prepared).items():
            refused.setdefault(i, overflow(f"its steering vectors are NaN or inf at {sites}"))
        for i in sorted(refused):
            self._fail(jobs[i], refused[i])
        if refused:
            rows = [i for i in range(len(jobs)) if i not in refused]
            if not rows:
                return None, []
            prepared = prepared.select(rows)
            jobs = [jobs[i] for i in rows]
        return prepared, jobs

    def _run_group(self, options: GenerationOptions, jobs: list[GenerationJob]) -> None:
        m = self.metrics
        start = time.perf_counter()
        for job in jobs:
            m.queue_seconds.observe(start - job.enqueued_at)
        prepared, jobs = self._prepare(jobs)
        if prepared is None:
            return
        m.steering_seconds.observe(time.perf_counter() - start)
        size = len(jobs)
        m.batch_size.observe(size)
        for job, result in zip(jobs, prepared.results, strict=True):
            job.emit(Started(replace(result), size))
        streamer = None
        if any(j.stream for j in jobs):
            sinks = [_delta_sink(j) if j.stream else None for j in jobs]
            streamer = RowStreamer(self.personalizer.model.tokenizer, self._eos, sinks)
        guard = FiniteGuard(len(jobs), self._eos)
        prepared = replace(prepared, additions=[*prepared.additions, guard])
        began = time.perf_counter()
        results = self.personalizer.decode(prepared, options, streamer=streamer)
        elapsed = time.perf_counter() - began
        tokens = sum(r.completion_tokens for r in results)
        m.generation_seconds.observe(elapsed)
        m.tokens_per_second.observe(tokens / max(elapsed, 1e-9))
        m.completion_tokens.inc(tokens)
        m.prompt_tokens.inc(sum(r.prompt_tokens for r in results))
        for job, result, broken in zip(jobs, results, guard.broken_rows(), strict=True):
            if broken:  # ended by the guard: its text is not the model's
                self._fail(job, overflow("its logits became NaN or inf while decoding"))
                continue
            m.generations.labels(steered=str(result.steered).lower()).inc()
            job.emit(Done(result, size))


def _delta_sink(job: GenerationJob) -> Callable[[str], None]:
    return lambda text: job.emit(Delta(text))
