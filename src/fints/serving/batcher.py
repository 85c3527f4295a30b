"""Dynamic batching: many concurrent requests, one model, one worker thread.

Requests wait in an asyncio queue. A collector task takes the first one, waits a
few milliseconds for company (or not at all when the worker was busy and the
queue filled meanwhile), and hands up to ``max_batch_size`` requests to the
single worker thread that owns the model. The worker groups them by
:class:`GenerationOptions` and runs each group as one
:meth:`Personalizer.prepare` + :meth:`Personalizer.decode` (what
:meth:`Personalizer.generate` does), every row steered with its own user's vectors.

Writes (adding history with extraction, forgetting a user) go through the same
queue and the same thread, so extraction and generation never share the model
at once, and a write acknowledged to a client is visible to every request
enqueued after it.

Streaming: a :class:`~fints.serving.streaming.RowStreamer` hands every streaming
row its own text deltas, which reach the request through the row's asyncio queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch
from transformers import LogitsProcessor

from fints.engine import GenerationRequest, GenerationResult, Personalizer, PreparedBatch
from fints.generation import Decoration, GenerationOptions, eos_token_ids
from fints.serving.api_errors import ApiError
from fints.serving.metrics import ServingMetrics
from fints.serving.streaming import RowStreamer

log = logging.getLogger(__name__)
T = TypeVar("T")


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

    def emit(self, event: Event) -> None:
        """Thread-safe: called from the worker."""
        if isinstance(event, Done | Failed):
            self.answered = True
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

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
    fn: Callable[[], Any]
    future: asyncio.Future[Any]


# -- the batcher ------------------------------------------------------------------------


class Batcher:
    """The queue, the collector task and the one worker thread that owns the model."""

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
        self._queue: asyncio.Queue[GenerationJob | WriteJob] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle (call from the server's event loop) --

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the batcher is already running")
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fints-model")
        self._task = asyncio.create_task(self._collect(), name="fints-batcher")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        assert self._queue is not None and self._executor is not None
        gone = ApiError(503, "the server is shutting down", type="server_error")
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if isinstance(job, GenerationJob):
                job.emit(Failed(gone))
            elif not job.future.done():
                job.future.set_exception(gone)
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)
        self._task = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    # -- submitting --

    def submit(
        self, request: GenerationRequest, options: GenerationOptions, *, stream: bool
    ) -> GenerationJob:
        job = GenerationJob(request, options, stream, asyncio.get_running_loop())
        self._put(job)
        return job

    async def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the model thread, in queue order, with the model to itself."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._put(WriteJob(fn, future))
        return await future

    def _put(self, job: GenerationJob | WriteJob) -> None:
        if self._queue is None or not self.running:
            raise ApiError(503, "the model worker is not running", type="server_error")
        if self._queue.qsize() >= self.max_queue:
            raise ApiError(
                503,
                f"the server is overloaded ({self.max_queue} requests waiting); retry later",
                type="overloaded_error",
                code="queue_full",
            )
        self._queue.put_nowait(job)
        self.metrics.queue_depth.set(self._queue.qsize())

    # -- the collector task --

    async def _collect(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        carry: GenerationJob | WriteJob | None = None
        while True:
            job = carry if carry is not None else await self._queue.get()
            carry = None
            if isinstance(job, WriteJob):
                await self._run_write(loop, job)
                continue
            batch = [job]
            if self.max_wait and self._queue.qsize() < self.max_batch_size - 1:
                await asyncio.sleep(self.max_wait)  # a few ms for others to join
            while len(batch) < self.max_batch_size and not self._queue.empty():
                more = self._queue.get_nowait()
                if isinstance(more, WriteJob):
                    carry = more  # a write is a barrier: it runs after this batch
                    break
                batch.append(more)
            self.metrics.queue_depth.set(self._queue.qsize())
            await loop.run_in_executor(self._executor, self._run_batch, batch)

    async def _run_write(self, loop: asyncio.AbstractEventLoop, job: WriteJob) -> None:
        try:
            value = await loop.run_in_executor(self._executor, job.fn)
        except Exception as exc:
            self.metrics.write_errors.inc()
            if not job.future.done():
                job.future.set_exception(exc)
        else:
            if not job.future.done():
                job.future.set_result(value)

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
            refused.setdefault(i, _overflow(f"its steering vectors are NaN or inf at {sites}"))
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
                self._fail(job, _overflow("its logits became NaN or inf while decoding"))
                continue
            m.generations.labels(steered=str(result.steered).lower()).inc()
            job.emit(Done(result, size))


def _overflow(what: str) -> ApiError:
    return ApiError(
        400,
        f"this request overflows: {what}; its steering strengths are too large for its "
        "user's vectors (lower fints.strengths, or use relative strengths)",
        param="fints.strengths",
        code="steering_overflow",
    )


#: A larger logit is an overflow, not a model's output: divided by the smallest temperature
#: (:data:`~fints.generation.MIN_TEMPERATURE`) it would leave the float32 range.
MAX_SCORE = 1e30


class _FiniteScores(LogitsProcessor):
    """Ends a row whose scores hold NaN or +inf (or no finite token at all) by allowing it
    only an end-of-sequence token, and records it. Sampling refuses a NaN probability for
    the whole batch, so one overflowing row would otherwise fail every row decoded with it;
    the scores of every other row are left exactly as they are.

    Scores beyond :data:`MAX_SCORE` count as overflowed too: the temperature divides them
    later (this runs before the sampling warpers) and they would become inf there."""

    def __init__(self, batch: int, eos_ids: set[int]) -> None:
        self.broken = torch.zeros(batch, dtype=torch.bool)
        self._eos = sorted(eos_ids)
        self._prompt_length: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._prompt_length is None:
            self._prompt_length = input_ids.shape[1]
        bad = torch.isnan(scores).any(-1) | (scores > MAX_SCORE).any(-1)
        bad |= (scores < -MAX_SCORE).all(-1)  # no token left that can be sampled
        if not bool(bad.any()):
            return scores
        record = bad
        if self._eos:  # a row that ended already (decoded on as padding) is not broken
            generated = input_ids[:, self._prompt_length :]
            ended = torch.isin(generated, torch.tensor(self._eos, device=generated.device))
            record = bad & ~ended.any(-1)
        self.broken |= record.cpu()
        allowed = torch.full_like(scores[0], float("-inf"))
        allowed[self._eos[0] if self._eos else 0] = 0.0
        return torch.where(bad.unsqueeze(-1), allowed, scores)  # type: ignore[return-value]


@dataclass
class FiniteGuard:
    """An addition to every batch the worker decodes: :class:`_FiniteScores` as a logits
    processor; afterwards :meth:`broken_rows` says which rows it had to end."""

    rows: int
    eos_ids: set[int]
    processor: _FiniteScores | None = None

    def __post_init__(self) -> None:
        self.processor = self.processor or _FiniteScores(self.rows, self.eos_ids)

    def select(self, rows: Sequence[int]) -> FiniteGuard:
        return FiniteGuard(len(rows), self.eos_ids)

    def decoration(self, model: Any) -> Decoration:
        return Decoration(logits_processors=(self.processor,))

    def annotate(self, results: Sequence[Any]) -> None:
        return None

    def broken_rows(self) -> list[bool]:
        assert self.processor is not None
        return [bool(b) for b in self.processor.broken.tolist()]


def nonfinite_rows(prepared: PreparedBatch) -> dict[int, list[str]]:
    """Rows whose per-row vectors (a mode's ``vectors``: ``{site: [batch, hidden]}``) hold
    NaN or inf, with those sites. The hooks refuse such a vector for the whole batch, so
    the worker takes these rows out first and fails them alone."""
    bad: dict[int, list[str]] = {}
    for addition in prepared.additions:
        vectors = getattr(addition, "vectors", None)
        if not isinstance(vectors, Mapping):
            continue
        for site, values in vectors.items():
            if isinstance(values, torch.Tensor) and values.dim() == 2:
                finite = torch.isfinite(values).all(dim=-1)
                for row in (~finite).nonzero().flatten().tolist():
                    bad.setdefault(int(row), []).append(str(site))
    return bad


def _delta_sink(job: GenerationJob) -> Callable[[str], None]:
    return lambda text: job.emit(Delta(text))
