"""Stop sequences: a row's decoding ends once its new text contains one of them.

Each row of a batch has its own stop sequences (the requests come from different
clients). :class:`StopSequences` is handed to ``generate`` as a stopping
criterion: after every step it decodes only the tail of each unfinished row that
could hold a stop sequence, and marks the row done once one appears, so a row
that hit its stop frees the batch instead of decoding to ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import StoppingCriteria

from fints.errors import InvalidInputError

MAX_STOP_CHARS = 64
_TOKENS_PER_CHAR = 4  # a character spans at most 4 byte-level tokens


def check_stops(stops: str | Sequence[str]) -> tuple[str, ...]:
    """The stop sequences as a tuple (one string is one sequence); each non-empty, <= 64 chars."""
    if isinstance(stops, str):
        stops = (stops,)
    for stop in stops:
        if not isinstance(stop, str) or not stop:
            raise InvalidInputError("a stop sequence is empty")
        if len(stop) > MAX_STOP_CHARS:
            raise InvalidInputError(
                f"a stop sequence is {len(stop)} characters long; at most {MAX_STOP_CHARS}"
            )
    return tuple(stops)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` cut before its first stop sequence, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=None)
    return (text, False) if cut is None else (text[:cut], True)


class StopSequences(StoppingCriteria):
    """Per-row stop sequences for ``generate``.

    ``stops[row]`` are the row's sequences (empty: the row never stops on text).
    ``stopped_at[row]`` is the number of new tokens the row had when its stop
    sequence appeared (None while it has not).
    """

    def __init__(self, tokenizer: Any, prompt_length: int, stops: Sequence[Sequence[str]]) -> None:
        self._tokenizer = tokenizer
        self._prompt_length = prompt_length
        self._stops = [check_stops(s) for s in stops]
        self._window = [_TOKENS_PER_CHAR * max(map(len, s), default=0) + 2 for s in self._stops]
        self.stopped_at: list[int | None] = [None] * len(stops)

    def __call__(
        self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any
    ) -> torch.BoolTensor:
        if input_ids.shape[0] != len(self._stops):
            raise ValueError(f"{len(self._stops)} rows of stops for {input_ids.shape[0]} rows")
        new = input_ids.shape[1] - self._prompt_length
        for row, stops in enumerate(self._stops):
            if not stops or self.stopped_at[row] is not None:
                continue
            tail = input_ids[row, input_ids.shape[1] - min(new, self._window[row]) :]
            text = self._tokenizer.decode(tail.tolist(), skip_special_tokens=True)
            if any(s in text for s in stops):
                self.stopped_at[row] = new
        done = [at is not None for at in self.stopped_at]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]
