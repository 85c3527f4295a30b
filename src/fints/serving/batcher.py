"""Dynamic batching: many concurrent requests, one model, one worker thread.

Requests wait in an asyncio queue. A collector task waits a few milliseconds for company
(not when enough wait already), picks the next *round* (:mod:`fints.serving.slicing`: up
to ``max_batch_size`` new requests and rows between two slices, tenants taking turns) and
hands it to the single worker thread that owns the model. The worker prepares the new
requests (a :meth:`Personalizer.prepare` per :class:`GenerationOptions`, every row steered
with its own user's vectors) and decodes each group of rows (those of one prepared batch,
with the same options) as one call of the personalizer's backend, the cheapest group
first. A long row decodes one slice of ``slice_tokens`` per round, going on from the
decoding state its last slice left (at most ``keep_kv_bytes`` of them kept at once;
beyond, a row's prefix is decoded again; with none kept, rows are sliced only while
tenants contend).

Writes (adding history with extraction, forgetting a user) run on the same thread, one
after another in arrival order, so extraction and generation never share the model at
once, and a write acknowledged to a client is visible to every request sent after the
acknowledgement. A write is a sequence of bounded steps (storing the items, then
extracting a few items at a time); between two steps the worker decodes a round of
whatever generation requests wait (generation first, then one write step).

Streaming: a :class:`~fints.serving.streaming.RowStreamer` hands every streaming row its
own text deltas (its detokenizer kept across slices) through the row's asyncio queue.
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

from fints.decode_state import KvCarry
from fints.engine import GenerationRequest, Personalizer, PreparedBatch
from fints.generation import GenerationOptions, eos_token_ids
from fints.serving.api_errors import ApiError
from fints.serving.guards import FiniteGuard, nonfinite_rows, overflow, queue_full, refusals
from fints.serving.jobs import (
    Delta,
    Done,
    Failed,
    GenerationJob,
    Started,
    WriteJob,
)
from fints.serving.metrics import ServingMetrics
from fints.serving.slicing import (
    Row,
    cost,
    keep_state,
    kept_bytes,
    pick_fair,
    prefill_chunk,
    remember,
    sliceable,
    tenant_of,
)
from fints.serving.streaming import IncrementalDecoder, RowStreamer
from fints.steps import Steps, advance, one_step

__all__ = [
    "Batcher",
    "Delta",
    "Done",
    "Failed",
    "GenerationJob",
    "Started",
    "nonfinite_rows",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
SLICE_TOKENS = 8  # under contention, new tokens per round of a long row (serving.slicing)
RECENT_S = 10.0  # a tenant with rows this recently still contends
KEEP_KV_MIB = 1024  # the decoding states kept for rows between slices, at most (MiB)
PREFILL_TOKENS = 256  # prompt ids a sliced group reads per round before it decodes


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
        slice_tokens: int | None = SLICE_TOKENS,
        keep_kv_bytes: int = KEEP_KV_MIB << 20,
        prefill_tokens: int | None = PREFILL_TOKENS,
    ) -> None:
        if max_batch_size < 1 or max_wait_ms < 0 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_wait_ms >= 0")
        if slice_tokens is not None and slice_tokens < 1:
            raise ValueError("slice_tokens must be >= 1 or None (no slices)")
        if keep_kv_bytes < 0:
            raise ValueError("keep_kv_bytes must be >= 0 (0: rows go on by decoding again)")
        if prefill_tokens is not None and prefill_tokens < 1:
            raise ValueError("prefill_tokens must be >= 1 or None (a prompt read at once)")
        self.personalizer = personalizer
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.max_prompt_tokens = max_prompt_tokens
        self.slice_tokens = slice_tokens
        self.keep_kv_bytes = keep_kv_bytes
        self.prefill_tokens = prefill_tokens
        self._eos = eos_token_ids(personalizer.model)
        self._jobs: deque[GenerationJob] = deque()  # generation requests, in arrival order
        self._rows: deque[Row] = deque()  # rows between two slices, in the order they came back
        self._round: list[GenerationJob] = []  # the requests of the last round
        self._seen: dict[str, float] = {}  # tenant -> when it last had a row in a round
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
        writes = [*([self._write] if self._write else []), *self._writes]
        self._write, self._writes = None, deque()
        for write in writes:
            if not write.future.done():
                write.future.set_exception(gone)
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)
        # waiting, between two slices, or in the last round (its unfinished rows are lost)
        for job in [*self._jobs, *(row.job for row in self._rows), *self._round]:
            if not job.answered:
                job.emit(Failed(gone))
        self._jobs, self._rows, self._round = deque(), deque(), []
        self._task = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def depth(self) -> int:
        """Requests and writes waiting (a write in progress counts until it is answered)."""
        return len(self._jobs) + len(self._rows) + len(self._writes) + (self._write is not None)

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

    async def run_steps(self, steps: Steps[T]) -> T:
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
            raise queue_full(self.max_queue)

    def _woken(self) -> None:
        assert self._wake is not None
        self.metrics.queue_depth.set(self.depth)
        self._wake.set()

    # -- the collector task --

    async def _collect(self) -> None:
        """Generation first: a round of the waiting requests and rows, then one step of the
        current write, and again; so a long write delays a request by one step at most."""
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._jobs and not self._rows and self._write is None and not self._writes:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._jobs or self._rows:
                fresh, rows, contended = await self._next_round()
                self.metrics.queue_depth.set(self.depth)
                if fresh or rows:
                    self._round = [*fresh, *(row.job for row in rows)]
                    tenants = [job.request.tenant for job in self._round]
                    self._seen = remember(self._seen, tenants, time.monotonic(), RECENT_S)
                    held = kept_bytes(self._rows)  # by the rows that wait for a later round
                    self._rows += await loop.run_in_executor(
                        self._executor, self._run_round, fresh, rows, contended, held
                    )
            if self._write is None and self._writes:
                self._write = self._writes.popleft()
            if self._write is not None:
                await self._step_write(loop, self._write)

    async def _next_round(self) -> tuple[list[GenerationJob], list[Row], bool]:
        """The new requests and the rows of the next round (:func:`pick_fair`), and whether
        tenants contend (then long rows decode one slice)."""
        if self.max_wait and len(self._jobs) + len(self._rows) < self.max_batch_size:
            await asyncio.sleep(self.max_wait)  # a few ms for others to join
        self._rows = deque(r for r in self._rows if not r.job.abandoned)
        self._jobs = deque(j for j in self._jobs if not j.abandoned)
        waiting: list[Row | GenerationJob] = [*self._rows, *self._jobs]  # the rows came first
        picked, contended = pick_fair(waiting, tenant_of, self.max_batch_size, set(self._seen))
        chosen = {id(x) for x in picked}
        self._rows = deque(r for r in self._rows if id(r) not in chosen)
        self._jobs = deque(j for j in self._jobs if id(j) not in chosen)
        fresh = [x for x in picked if isinstance(x, GenerationJob)]
        return fresh, [x for x in picked if isinstance(x, Row)], contended

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

    def _run_round(
        self, fresh: list[GenerationJob], rows: list[Row], contended: bool, held: int = 0
    ) -> list[Row]:
        """One round: prepare the new requests, then decode one slice of every row (a
        group per prepared batch, decoding state and options, the cheapest first). Returns
        the rows that are not done; ``held``: the bytes of decoding states kept by rows
        that wait for a later round."""
        rows = [*rows, *self._start(fresh)]
        # going on from a kept state costs a slice about what decoding on would
        slice_tokens = self.slice_tokens if contended or self.keep_kv_bytes else None
        groups: dict[tuple[int, int, GenerationOptions], list[Row]] = {}
        for row in rows:
            if not row.job.abandoned:
                key = (id(row.origin), id(row.state), row.options(slice_tokens))
                groups.setdefault(key, []).append(row)
        unfinished: list[Row] = []
        budget = [self.keep_kv_bytes - held]  # what this round's rows may keep
        for (*_, options), group in sorted(groups.items(), key=lambda g: cost(g[1], g[0][2])):
            try:
                unfinished += self._run_slice(options, group, budget, slice_tokens is not None)
            except BaseException as exc:  # never let one batch take the worker down
                log.exception("batch of %d failed", len(group))
                for row in group:
                    if not row.job.answered:
                        self._fail(row.job, exc)
        return unfinished

    def _start(self, jobs: list[GenerationJob]) -> list[Row]:
        """Prepare new requests (a batch per options) into rows; each is told it started."""
        groups: dict[GenerationOptions, list[GenerationJob]] = {}
        for job in jobs:
            if not job.abandoned:
                groups.setdefault(job.options, []).append(job)
        rows: list[Row] = []
        tokenizer = self.personalizer.model.tokenizer
        for options, group in groups.items():
            start = time.perf_counter()
            for job in group:
                self.metrics.queue_seconds.observe(start - job.enqueued_at)
            try:
                prepared, group = self._prepare(group)
            except BaseException as exc:
                log.exception("preparing a batch of %d failed", len(group))
                for job in group:
                    if not job.answered:
                        self._fail(job, exc)
                continue
            if prepared is None:
                continue
            self.metrics.steering_seconds.observe(time.perf_counter() - start)
            can_slice = sliceable(prepared, options)
            for i, (job, result) in enumerate(zip(group, prepared.results, strict=True)):
                job.emit(Started(replace(result), len(group)))
                decoder = IncrementalDecoder(tokenizer) if job.stream else None
                rows.append(Row(job, prepared, i, can_slice, decoder=decoder))
        return rows

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
        refused = refusals(prepared, [j.request.raw_prompt for j in jobs], self.max_prompt_tokens)
        for i in sorted(refused):
            self._fail(jobs[i], refused[i])
        if refused:
            rows = [i for i in range(len(jobs)) if i not in refused]
            if not rows:
                return None, []
            prepared = prepared.select(rows)
            jobs = [jobs[i] for i in rows]
        return prepared, jobs

    def _run_slice(
        self, options: GenerationOptions, group: list[Row], budget: list[int], sliced: bool
    ) -> list[Row]:
        """Decode ``options.max_new_tokens`` more tokens of rows of one prepared batch (from
        their decoding state if they have one); answer the rows that are done, return the
        others, with the state to go on from while ``budget[0]`` bytes allow. While rows
        are ``sliced``, a long prompt is first read ``prefill_tokens`` ids per round."""
        m = self.metrics
        tokenizer = self.personalizer.model.tokenizer
        origin = group[0].origin
        prepared = origin.select([row.index for row in group])
        state = group[0].state  # the group's rows share it (see _run_round)
        carry = KvCarry(state.select([row.kv[1] for row in group if row.kv]) if state else None)
        backend = self.personalizer.backend
        if sliced and prefill_chunk(backend, group, prepared, carry, budget, self.prefill_tokens):
            return group  # its prompts partly read: the rest, and decoding, in later rounds
        size = len(group)
        m.batch_size.observe(size)
        streamer = None
        if any(row.decoder for row in group):
            streamer = RowStreamer(
                tokenizer,
                self._eos,
                [_delta_sink(row.job) if row.decoder else None for row in group],
                decoders=[row.decoder for row in group],
                open_rows=[row.remaining > options.max_new_tokens for row in group],
            )
        guard = FiniteGuard(size, self._eos)
        began = time.perf_counter()
        completions = self.personalizer.backend.decode(
            [row.prompt for row in group],
            [*prepared.additions, guard],
            options,
            streamer=streamer,
            stops=prepared.stops,
            carry=carry,
        )
        elapsed = time.perf_counter() - began
        tokens = sum(len(c.token_ids) for c in completions)
        m.generation_seconds.observe(elapsed)
        m.tokens_per_second.observe(tokens / max(elapsed, 1e-9))
        m.completion_tokens.inc(tokens)
        unfinished: list[Row] = []
        for row, completion, broken in zip(group, completions, guard.broken_rows(), strict=True):
            if broken:  # ended by the guard: its text is not the model's
                self._fail(row.job, overflow("its logits became NaN or inf while decoding"))
                continue
            done = row.advance(completion, tokenizer, options.max_new_tokens)
            if done is None:
                unfinished.append(row)
                continue
            if row.decoder is not None and (tail := row.decoder.finish()):
                row.job.emit(Delta(tail))
            result = origin.results[row.index]
            result.text, result.finish_reason = done.text, done.finish_reason
            result.completion_tokens = len(done.token_ids)
            m.prompt_tokens.inc(result.prompt_tokens)
            m.generations.labels(steered=str(result.steered).lower()).inc()
            row.job.emit(Done(result, size))
        keep_state(carry, group, unfinished, budget)
        return unfinished


def _delta_sink(job: GenerationJob) -> Callable[[str], None]:
    return lambda text: job.emit(Delta(text))
