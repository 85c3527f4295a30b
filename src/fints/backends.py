"""Decoding backends: what turns prepared prompts and mode additions into completions.

``transformers`` (``model.generate`` with hooks and logits processors) and vLLM
(:mod:`fints.vllm_engine`, an optional install) are registered in :data:`BACKENDS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from fints.decode_state import KvCarry
from fints.generation import Completion, GenerationOptions, generate_batch, prefill_batch
from fints.models import LoadedModel
from fints.modes import Addition


class Backend(Protocol):
    def decode(
        self,
        prompts: Sequence[Sequence[int]],
        additions: Sequence[Addition],
        options: GenerationOptions,
        *,
        streamer: Any = None,
        stops: Sequence[Sequence[str]] | None = None,
        carry: KvCarry | None = None,
    ) -> list[Completion]:
        """Decode ``prompts``. ``carry``: a decoding state to go on from and where this
        call stopped (:mod:`fints.decode_state`); a backend that keeps none leaves
        ``carry.state`` None and decodes the prompts from the start."""
        ...

    def prefill(
        self,
        prompts: Sequence[Sequence[int]],
        additions: Sequence[Addition],
        carry: KvCarry,
        tokens: int,
    ) -> bool:
        """Read at most ``tokens`` more prompt ids into ``carry.state`` without decoding;
        False (and nothing read) when nothing is left to read or the backend keeps no
        state, so the caller decodes instead."""
        ...


class TransformersBackend:
    """``generate`` on a :class:`LoadedModel`; each addition decorates the call."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model

    def decode(
        self,
        prompts: Sequence[Sequence[int]],
        additions: Sequence[Addition],
        options: GenerationOptions,
        *,
        streamer: Any = None,
        stops: Sequence[Sequence[str]] | None = None,
        carry: KvCarry | None = None,
    ) -> list[Completion]:
        return generate_batch(
            self.model,
            prompts,
            options,
            streamer=streamer,
            stops=stops,
            decorations=[a.decoration(self.model) for a in additions],
            carry=carry,
        )

    def prefill(
        self,
        prompts: Sequence[Sequence[int]],
        additions: Sequence[Addition],
        carry: KvCarry,
        tokens: int,
    ) -> bool:
        decorations = [a.decoration(self.model) for a in additions]
        return prefill_batch(self.model, prompts, carry, tokens, decorations)


def _vllm_backend(model: LoadedModel) -> Backend:
    """vLLM (an optional install): paged attention, steering by the fints vLLM plugin."""
    from fints.vllm_engine.backend import VllmBackend

    return VllmBackend(model)


#: Backends by name, each made from the loaded model.
BACKENDS: dict[str, Callable[[LoadedModel], Backend]] = {
    "transformers": TransformersBackend,
    "vllm": _vllm_backend,
}
