"""Batched decoding of prompts, each row with its own steering vectors."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, LogitsProcessorList

from fints.decode_state import DecodeState, KvCarry
from fints.errors import InvalidInputError
from fints.models import LoadedModel
from fints.prompts import pad_batch
from fints.stopping import StopSequences, cut_at_stop

#: The smallest positive sampling temperature: below it the scaled logits overflow to inf
#: and the probabilities become NaN (0 means greedy decoding).
MIN_TEMPERATURE = 1e-3
#: The seeds torch accepts (``torch.manual_seed``).
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # always decode max_new_tokens (for benchmarks)
    #: > 1 makes tokens already in the row (prompt or answer) less likely (CTRL's
    #: penalty, transformers' ``repetition_penalty``); 1: off. Small models loop without.
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= 4096:
            raise InvalidInputError(f"max_new_tokens must be in 1..4096, got {self.max_new_tokens}")
        if not _is_number(self.temperature) or not (
            self.temperature == 0 or MIN_TEMPERATURE <= self.temperature < math.inf
        ):
            raise InvalidInputError(
                f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}, "
                f"got {self.temperature!r}",
                param="temperature",
            )
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p!r}", param="top_p")
        if not _is_number(self.repetition_penalty) or not 1 <= self.repetition_penalty <= 10:
            raise InvalidInputError(
                f"repetition_penalty must be in [1, 10] (1: off), got {self.repetition_penalty!r}",
                param="repetition_penalty",
            )
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not MIN_SEED <= self.seed <= MAX_SEED
        ):
            raise InvalidInputError(
                f"seed must be an integer in [-2**63, 2**64 - 1], got {self.seed!r}",
                param="seed",
            )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Decoration:
    """What a generation mode adds to one ``generate`` call: hooks (entered around it)
    and logits processors."""

    context: AbstractContextManager[Any] = field(default_factory=nullcontext)
    logits_processors: tuple[Any, ...] = ()


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop sequence) or "length"


@torch.inference_mode()
def generate_batch(
    model: LoadedModel,
    prompts: Sequence[Sequence[int]],
    options: GenerationOptions | None = None,
    streamer: Any = None,
    stops: Sequence[Sequence[str]] | None = None,
    decorations: Sequence[Decoration] = (),
    carry: KvCarry | None = None,
) -> list[Completion]:
    """Decode every prompt, with each decoration's hooks (e.g. per-row steering vectors,
    see :class:`fints.modes.SteeringAddition`) and logits processors applied.

    ``stops[row]``: that row's stop sequences. Its decoding ends once one appears,
    and its text is cut before it. ``carry``: go on from ``carry.state`` (the prompts
    must be its rows' ids) instead of reading the prompts from the start, and leave
    where this call stopped in ``carry.state`` (:mod:`fints.decode_state`).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InvalidInputError("every prompt needs at least one token")
    if stops and len(stops) != len(prompts):
        raise InvalidInputError(f"{len(stops)} rows of stop sequences for {len(prompts)} prompts")
    options = options or GenerationOptions()
    tok = model.tokenizer
    state = carry.state if carry is not None else None
    if state is not None:
        state.check(prompts)
        input_ids, attention = state.sequences, state.attention
    else:
        input_ids, attention = pad_batch(prompts, tok.pad_token_id, side="left")
        state = DecodeState(input_ids, attention, None)
    decoding: dict[str, Any] = {"do_sample": False}
    if options.temperature > 0:
        decoding = {"do_sample": True, "temperature": options.temperature, "top_p": options.top_p}
    if options.repetition_penalty != 1:
        decoding["repetition_penalty"] = options.repetition_penalty
    if options.ignore_eos:
        decoding["min_new_tokens"] = options.max_new_tokens
    eos = eos_token_ids(model)
    criteria = StopSequences(tok, input_ids.shape[1], stops) if stops and any(stops) else None
    if criteria is not None:
        decoding["stopping_criteria"] = [criteria]
    processors = [p for d in decorations for p in d.logits_processors]
    if processors:
        decoding["logits_processor"] = LogitsProcessorList(processors)
    if carry is not None:
        decoding["return_dict_in_generate"] = True
        if state.cache is not None:
            decoding["past_key_values"] = state.cache
    with ExitStack() as stack:
        for decoration in decorations:
            stack.enter_context(decoration.context)
        seed = options.seed if options.temperature > 0 else None
        stack.enter_context(_seeded(seed, model.device))
        out = model.model.generate(  # type: ignore[operator]
            input_ids=input_ids.to(model.device),
            attention_mask=attention.to(model.device),
            max_new_tokens=options.max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=sorted(eos),
            streamer=streamer,
            top_k=None,
            **decoding,
        )
    if carry is not None:
        carry.state = state.grown(out.sequences, out.past_key_values)
        out = out.sequences
    completions = []
    for row, prompt in enumerate(prompts):
        new = out[row, input_ids.shape[1] :].tolist()
        end = next((i for i, t in enumerate(new) if t in eos), None)
        at_stop = criteria.stopped_at[row] if criteria is not None else None
        if at_stop is not None and (end is None or at_stop < end):
            end = at_stop
        tokens = new if end is None else new[:end]
        row_stops = stops[row] if at_stop is not None and stops else ()
        completions.append(
            Completion(
                text=completion_text(tok, tokens, row_stops),
                token_ids=tokens,
                prompt_tokens=len(prompt),
                finish_reason="length" if end is None else "stop",
            )
        )
    return completions


def completion_text(tokenizer: Any, tokens: Sequence[int], stops: Sequence[str] = ()) -> str:
    """A row's new tokens as every backend reports them: decoded without special tokens,
    stripped, and cut before the first of ``stops`` (all before the stop, as streamed;
    pass none when the row did not end on one)."""
    text = str(tokenizer.decode(list(tokens), skip_special_tokens=True)).lstrip()
    cut, found = cut_at_stop(text, stops)
    return cut if found else text.rstrip()


@contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Sample under ``seed`` without touching the process's random state (restored after)."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def eos_token_ids(model: LoadedModel) -> set[int]:
    """The token ids that end a row: the tokenizer's and the generation config's."""
    ids: set[int] = set()
    for value in (model.tokenizer.eos_token_id, model.model.generation_config.eos_token_id):
        if isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
        elif value is not None:
            ids.add(int(value))
    return ids


@torch.inference_mode()
def prefill_batch(
    model: LoadedModel,
    prompts: Sequence[Sequence[int]],
    carry: KvCarry,
    tokens: int,
    decorations: Sequence[Decoration] = (),
) -> bool:
    """Read at most ``tokens`` more ids of the (left-padded) ``prompts`` into
    ``carry.state``'s cache without decoding, under the decorations' hooks, always leaving
    the last id for ``generate``; False when there was nothing left to read this way."""
    state = carry.state
    if state is None:
        ids, mask = pad_batch(prompts, model.tokenizer.pad_token_id, side="left")
        state = DecodeState(ids.to(model.device), mask.to(model.device), None)
    else:
        state.check(prompts)
    start, end = state.read, min(state.read + tokens, state.sequences.shape[1] - 1)
    if end <= start:
        carry.state = state
        return False
    mask = state.attention[:, :end]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate() makes them
    with ExitStack() as stack:
        for decoration in decorations:
            stack.enter_context(decoration.context)
        out = model.model.base_model(  # the decoder alone: no logits are needed
            input_ids=state.sequences[:, start:end],
            attention_mask=mask,
            position_ids=positions[:, start:end],
            past_key_values=(
                state.cache if state.cache is not None else DynamicCache(config=model.model.config)
            ),
            use_cache=True,
        )
    carry.state = DecodeState(state.sequences, state.attention, out.past_key_values)
    return True
