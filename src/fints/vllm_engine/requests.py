"""fints rows as vLLM requests, and vLLM outputs as fints completions.

What a generation mode adds to a row becomes plain data in the row's sampling
parameters (see :mod:`fints.vllm_plugin`). Each addition type that vLLM can carry
registers a translator in :data:`ROW_EXTRAS`; an addition without one is refused
with an error that names the mode, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fints.errors import InvalidInputError
from fints.generation import Completion, GenerationOptions, completion_text
from fints.modes import Addition, SteeringAddition
from fints.vllm_plugin.packing import STEERING_KEY, pack_steering, steering_salt


def _steering_extras(addition: Addition) -> list[dict[str, Any]]:
    """Per row its non-zero vectors, packed; an unsteered row carries nothing (vLLM's
    zero slot), so it decodes as plain vLLM and shares the plain prefix cache."""
    assert isinstance(addition, SteeringAddition)
    extras: list[dict[str, Any]] = []
    for row in range(len(addition.retrieved)):
        vectors = {s: v[row] for s, v in addition.vectors.items() if v[row].any()}
        extras.append({STEERING_KEY: pack_steering(vectors)} if vectors else {})
    return extras


#: Per addition type: its per-row ``extra_args`` for vLLM.
ROW_EXTRAS: dict[type, Callable[[Addition], list[dict[str, Any]]]] = {
    SteeringAddition: _steering_extras,
}


def row_extras(additions: Sequence[Addition], rows: int) -> list[dict[str, Any]]:
    """Every row's ``extra_args``, merged over the batch's additions."""
    extras: list[dict[str, Any]] = [{} for _ in range(rows)]
    for addition in additions:
        translate = ROW_EXTRAS.get(type(addition))
        if translate is None:
            raise InvalidInputError(
                f"{type(addition).__name__} is not available on the vLLM engine (it carries "
                f"{sorted(t.__name__ for t in ROW_EXTRAS)}); serve with --engine transformers"
            )
        for extra, more in zip(extras, translate(addition), strict=True):
            extra.update(more)
    return extras


@dataclass(frozen=True)
class VllmRow:
    """One row as vLLM takes it: the prompt input and the sampling parameters' arguments."""

    prompt: dict[str, Any]  # a TokensPrompt
    sampling: dict[str, Any]  # SamplingParams(**sampling)


def vllm_rows(
    prompts: Sequence[Sequence[int]],
    additions: Sequence[Addition],
    options: GenerationOptions,
    stops: Sequence[Sequence[str]] | None,
    eos: set[int],
) -> list[VllmRow]:
    """The batch's rows with each row's steering packed and its prefix cache salted by it."""
    extras = row_extras(additions, len(prompts))
    rows = []
    for i, prompt in enumerate(prompts):
        sampling: dict[str, Any] = {
            "max_tokens": options.max_new_tokens,
            "temperature": options.temperature,
            "top_p": options.top_p if options.temperature > 0 else 1.0,
            "repetition_penalty": options.repetition_penalty,
            "stop_token_ids": sorted(eos),
            "stop": list(stops[i]) if stops else [],
            "skip_special_tokens": True,
            "extra_args": extras[i] or None,
        }
        if options.temperature > 0 and options.seed is not None:
            sampling["seed"] = options.seed
        if options.ignore_eos:
            sampling.update(ignore_eos=True, min_tokens=options.max_new_tokens, stop_token_ids=[])
        request: dict[str, Any] = {"prompt_token_ids": list(prompt)}
        salt = steering_salt(extras[i].get(STEERING_KEY))
        if salt is not None:
            request["cache_salt"] = salt
        rows.append(VllmRow(request, sampling))
    return rows


def completion_of(
    tokenizer: Any,
    prompt_tokens: int,
    token_ids: Sequence[int],
    finish_reason: str | None,
    stops: Sequence[str],
    eos: set[int],
) -> Completion:
    """A vLLM output as fints reports it: the text decoded and cut the way the
    transformers backend does (:func:`fints.generation.generate_batch`)."""
    tokens = list(token_ids)
    if tokens and tokens[-1] in eos:
        tokens = tokens[:-1]
    return Completion(
        text=completion_text(tokenizer, tokens, stops),
        token_ids=tokens,
        prompt_tokens=prompt_tokens,
        finish_reason="length" if finish_reason == "length" else "stop",
    )
