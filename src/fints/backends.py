"""Decoding backends: what turns prepared prompts and mode additions into completions.

``transformers`` (``model.generate`` with hooks and logits processors) is the one
today; a vLLM backend registers beside it in :data:`BACKENDS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from fints.generation import Completion, GenerationOptions, generate_batch
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
    ) -> list[Completion]: ...


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
    ) -> list[Completion]:
        return generate_batch(
            self.model,
            prompts,
            options,
            streamer=streamer,
            stops=stops,
            decorations=[a.decoration(self.model) for a in additions],
        )


#: Backends by name, each made from the loaded model.
BACKENDS: dict[str, Callable[[LoadedModel], Backend]] = {"transformers": TransformersBackend}
