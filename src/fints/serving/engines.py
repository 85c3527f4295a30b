"""Generation engines of the server, by name: what decodes the requests.

``transformers``: the :class:`~fints.serving.batcher.Batcher` itself (dynamic batches
on the model thread). ``vllm``: :class:`~fints.serving.vllm_scheduler.VllmScheduler`
on vLLM's async engine (an optional install; steering by :mod:`fints.vllm_plugin`).
Either way writes run on the batcher's model thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from fints.engine import GenerationRequest, Personalizer
from fints.generation import GenerationOptions
from fints.serving.batcher import Batcher
from fints.serving.jobs import GenerationJob
from fints.serving.metrics import ServingMetrics


class Generation(Protocol):
    """What the routes submit generation requests to."""

    @property
    def running(self) -> bool: ...

    @property
    def depth(self) -> int: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def submit(
        self,
        request: GenerationRequest,
        options: GenerationOptions,
        *,
        stream: bool,
        on_finished: Callable[[], None] | None = None,
    ) -> GenerationJob: ...


class _OnBatcher:
    """The batcher decodes (it is started and stopped as the writer, not again here)."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher

    @property
    def running(self) -> bool:
        return self.batcher.running

    @property
    def depth(self) -> int:
        return 0  # counted as the batcher's

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def submit(
        self,
        request: GenerationRequest,
        options: GenerationOptions,
        *,
        stream: bool,
        on_finished: Callable[[], None] | None = None,
    ) -> GenerationJob:
        return self.batcher.submit(request, options, stream=stream, on_finished=on_finished)


def _transformers(
    personalizer: Personalizer, metrics: ServingMetrics, batcher: Batcher
) -> Generation:
    return _OnBatcher(batcher)


def _vllm(personalizer: Personalizer, metrics: ServingMetrics, batcher: Batcher) -> Generation:
    from fints.vllm_engine.backend import VllmSettings, require_vllm

    require_vllm()
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from fints.serving.vllm_scheduler import VllmScheduler

    # room for the longest prompt the server accepts and the most new tokens a request
    # may ask for (GenerationOptions allows 4096), so vLLM never refuses a checked request
    settings = VllmSettings(max_model_len=batcher.max_prompt_tokens + 4096)
    args = settings.engine_args(personalizer.model)
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
    return VllmScheduler(
        personalizer,
        metrics,
        engine,
        max_queue=batcher.max_queue,
        max_prompt_tokens=batcher.max_prompt_tokens,
    )


#: Generation engines by name, each made from the personalizer, metrics and batcher.
ENGINES: dict[str, Callable[[Personalizer, ServingMetrics, Batcher], Generation]] = {
    "transformers": _transformers,
    "vllm": _vllm,
}
