"""Generation on vLLM's async engine (``fints serve --engine vllm``).

The transformers engine needs :class:`~fints.serving.batcher.Batcher` to group
requests into batches. vLLM batches continuously by itself, so here every request
goes its own way: it is prepared (retrieval, the user's vectors, the prompt) on a
preparing thread, submitted to vLLM at once with its vectors packed in its sampling
parameters (:mod:`fints.vllm_plugin`), and answered with the same events a batcher
job gets (:class:`Started`, :class:`Delta`, :class:`Done`, :class:`Failed`), so the
routes and the response shapes are the same for both engines. A row joins the running
batch at the next step, and leaves it when it ends; nobody waits for another's row.

Writes (history, extraction on the transformers model, deletion) still go through the
batcher's model thread, which no longer decodes; the async engine runs in its own
process, so extraction does not slow decoding down beyond sharing the cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from fints.engine import GenerationRequest, GenerationResult, Personalizer, PreparedBatch
from fints.generation import GenerationOptions, eos_token_ids
from fints.serving.api_errors import ApiError
from fints.serving.guards import queue_full, refusals
from fints.serving.jobs import Delta, Done, Failed, GenerationJob, Started
from fints.serving.metrics import ServingMetrics
from fints.serving.streaming import IncrementalDecoder
from fints.vllm_engine.requests import completion_of, vllm_rows

log = logging.getLogger(__name__)


class VllmScheduler:
    """Submit each request to a ``vllm.v1.engine.async_llm.AsyncLLM`` as it comes."""

    def __init__(
        self,
        personalizer: Personalizer,
        metrics: ServingMetrics,
        engine: Any,
        *,
        max_queue: int = 256,
        max_prompt_tokens: int = 2048,
    ) -> None:
        self.personalizer = personalizer
        self.metrics = metrics
        self.engine = engine
        self.max_queue = max_queue
        self.max_prompt_tokens = max_prompt_tokens
        self._eos = eos_token_ids(personalizer.model)
        self._ids = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fints-prepare")

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.engine.shutdown()

    @property
    def running(self) -> bool:
        return self._executor is not None and not getattr(self.engine, "errored", False)

    @property
    def depth(self) -> int:
        """Requests being prepared or decoded."""
        return len(self._tasks)

    def submit(
        self,
        request: GenerationRequest,
        options: GenerationOptions,
        *,
        stream: bool,
        on_finished: Callable[[], None] | None = None,
    ) -> GenerationJob:
        """Start a request; ``on_finished`` runs once it is answered or abandoned."""
        if not self.running:
            raise ApiError(503, "the vLLM engine is not running", type="server_error")
        if self.depth >= self.max_queue:
            raise queue_full(self.max_queue)
        job = GenerationJob(request, options, stream, asyncio.get_running_loop())
        job.on_finished = on_finished
        task = asyncio.create_task(self._run(job), name="fints-vllm-request")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def _run(self, job: GenerationJob) -> None:
        request_id = f"fints-{next(self._ids)}"
        try:
            await self._decode(job, request_id)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self.engine.abort(request_id)
            job.emit(Failed(ApiError(503, "the server is shutting down", type="server_error")))
            raise
        except Exception as exc:
            if not isinstance(exc, ApiError):
                log.exception("request %s failed", request_id)
            self.metrics.generation_errors.inc()
            job.emit(Failed(exc))

    async def _decode(self, job: GenerationJob, request_id: str) -> None:
        from vllm import SamplingParams

        loop = asyncio.get_running_loop()
        began = time.perf_counter()
        prepared = await loop.run_in_executor(self._executor, self._prepare, job)
        self.metrics.steering_seconds.observe(time.perf_counter() - began)
        if job.abandoned:
            return
        options, stops = job.options, prepared.stops
        row = vllm_rows(prepared.prompts, prepared.additions, options, stops, self._eos)[0]
        result = prepared.results[0]
        job.emit(Started(replace(result), 1))
        decoder = IncrementalDecoder(self.personalizer.model.tokenizer) if job.stream else None
        decoding = time.perf_counter()
        seen = 0
        final = None
        params = SamplingParams(**row.sampling)
        async for output in self.engine.generate(row.prompt, params, request_id):
            if job.abandoned:
                await self.engine.abort(request_id)
                job.finish()
                return
            final = output.outputs[0]
            if decoder is not None:
                new = [t for t in final.token_ids[seen:] if t not in self._eos]
                text = "".join(decoder.add(t) for t in new)
                if text:
                    job.emit(Delta(text))
            seen = len(final.token_ids)
        assert final is not None
        if decoder is not None and (rest := decoder.finish()):
            job.emit(Delta(rest))
        completion = completion_of(
            self.personalizer.model.tokenizer,
            len(prepared.prompts[0]),
            final.token_ids,
            final.finish_reason,
            job.request.stop,
            self._eos,
        )
        result.text = completion.text
        result.completion_tokens = len(completion.token_ids)
        result.finish_reason = completion.finish_reason
        self._count(result, time.perf_counter() - decoding)
        job.emit(Done(result, 1))

    def _count(self, result: GenerationResult, seconds: float) -> None:
        m = self.metrics
        m.batch_size.observe(1)  # vLLM batches continuously: each request is its own row
        m.generation_seconds.observe(seconds)
        m.tokens_per_second.observe(result.completion_tokens / max(seconds, 1e-9))
        m.completion_tokens.inc(result.completion_tokens)
        m.prompt_tokens.inc(result.prompt_tokens)
        m.generations.labels(steered=str(result.steered).lower()).inc()

    def _prepare(self, job: GenerationJob) -> PreparedBatch:
        """On the preparing thread: the row's vectors and prompt, or the reason it is refused."""
        prepared = self.personalizer.prepare([job.request])
        refused = refusals(prepared, [job.request.raw_prompt], self.max_prompt_tokens)
        if refused:
            raise refused[0]
        return prepared
