"""Streaming: per-row text deltas from the ``[batch]`` tokens of each decoding step.

:class:`RowStreamer` receives each step's tokens from ``generate`` and hands
every streaming row its own text deltas, incrementally detokenized by an
:class:`IncrementalDecoder`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer


class IncrementalDecoder:
    """Text deltas of a growing token list whose concatenation is ``decode(ids).strip()``.

    Held back: a trailing incomplete UTF-8 sequence (decoded as U+FFFD) and
    trailing whitespace (the final text is stripped), until more tokens come.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = ""

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._decode()
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text.rstrip())

    def finish(self) -> str:
        return self._advance(self._decode().rstrip())

    def _decode(self) -> str:
        return str(self._tokenizer.decode(self._ids, skip_special_tokens=True)).lstrip()

    def _advance(self, stable: str) -> str:
        if not stable.startswith(self._emitted):
            return ""  # earlier text changed under a merge; what was sent stays sent
        delta = stable[len(self._emitted) :]
        self._emitted = stable
        return delta


class RowStreamer(BaseStreamer):
    """Splits each decoding step's ``[batch]`` tokens into per-row text deltas.

    ``sinks[row]`` receives the row's deltas (None: the row does not stream).
    A row ends at its first end-of-sequence token (:func:`~fints.generation.eos_token_ids`),
    as in :func:`~fints.generation.generate_batch`.

    A row decoded in slices (:mod:`fints.serving.slicing`) brings its own ``decoders[row]``
    from slice to slice, and is ``open``: the end of a slice does not finish its text
    (whoever finishes the row calls the decoder's :meth:`~IncrementalDecoder.finish`).
    """

    def __init__(
        self,
        tokenizer: Any,
        eos_ids: set[int],
        sinks: Sequence[Callable[[str], None] | None],
        decoders: Sequence[IncrementalDecoder | None] | None = None,
        open_rows: Sequence[bool] = (),
    ) -> None:
        self._sinks = list(sinks)
        self._decoders = list(
            decoders or [IncrementalDecoder(tokenizer) if s else None for s in sinks]
        )
        self._finished = [s is None for s in sinks]
        self._open = list(open_rows) or [False] * len(sinks)
        self._eos = eos_ids
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first pushes the prompt ids
            self._prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self._finished[row]:
                continue
            if token in self._eos:
                self._finish(row)
                continue
            decoder, sink = self._decoders[row], self._sinks[row]
            assert decoder is not None and sink is not None
            delta = decoder.add(int(token))
            if delta:
                sink(delta)

    def end(self) -> None:
        for row in range(len(self._sinks)):
            if not self._finished[row] and not self._open[row]:
                self._finish(row)

    def _finish(self, row: int) -> None:
        self._finished[row] = True
        decoder, sink = self._decoders[row], self._sinks[row]
        if decoder is not None and sink is not None:
            delta = decoder.finish()
            if delta:
                sink(delta)
