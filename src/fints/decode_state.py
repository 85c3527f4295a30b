"""Decoding that stops and goes on later without recomputing what it has read.

A server that decodes long rows in slices (:mod:`fints.serving.slicing`) would otherwise
run each row's whole prefix (prompt plus the tokens so far) through the model again at
every slice. A :class:`DecodeState` keeps what ``generate`` had at the end of a slice:
the rows' ids (left-padded prompts and their new tokens), their attention mask and the
model's key/value cache of every id but the last. Decoding the same rows on from it feeds
the model only the ids it has not seen, exactly as if the slice had gone on. A state can
also hold a prompt read only in part (:func:`fints.generation.prefill_batch`: a long
prompt read a chunk per round, so it never holds the model for its whole prefill).

A backend that can go on from a state takes a :class:`KvCarry` (``state`` in: where to go
on from, or None; ``state`` out: where this call stopped, or None when the backend keeps
none). The prompts are always passed in full as well, so a backend that keeps no state
(vLLM has its own cache) decodes them from the start and gives the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(eq=False)
class DecodeState:
    """Where one batch's decoding stopped (see the module docstring)."""

    sequences: torch.Tensor  # [rows, length]: left-padded prompts and their new tokens
    attention: torch.Tensor  # [rows, length]: 1 on the rows' ids, 0 on padding
    cache: Any  # transformers' Cache over sequences[:, :read] (None: nothing read yet)
    used: bool = False  # gone on from once: the cache has moved on (a state is read once)

    @property
    def rows(self) -> int:
        return int(self.sequences.shape[0])

    @property
    def read(self) -> int:
        """How many of the ids (columns of ``sequences``) the cache holds."""
        return 0 if self.cache is None else int(self.cache.get_seq_length())

    @property
    def unread(self) -> int:
        """Ids the model has yet to read before it can decode (the last one included)."""
        return int(self.sequences.shape[1]) - self.read

    @property
    def nbytes(self) -> int:
        """The bytes the cache holds (keys and values of every layer)."""
        total = 0
        for layer in getattr(self.cache, "layers", ()):
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total

    def select(self, rows: Sequence[int]) -> DecodeState:
        """The state of ``rows`` (in that order) alone. The cache is narrowed in place, so
        this state is used up: it can be selected from, or gone on from, once."""
        if self.used:
            raise ValueError("this decoding state was already gone on from")
        self.used = True
        if list(rows) == list(range(self.rows)):
            return DecodeState(self.sequences, self.attention, self.cache)
        index = torch.tensor(list(rows), dtype=torch.long, device=self.sequences.device)
        self.cache.batch_select_indices(index)
        return DecodeState(self.sequences[index], self.attention[index], self.cache)

    def check(self, prompts: Sequence[Sequence[int]]) -> None:
        """Refuse to go on for ``prompts`` that are not this state's rows' ids."""
        if len(prompts) != self.rows:
            raise ValueError(f"a decoding state of {self.rows} rows for {len(prompts)} prompts")
        for row, prompt in enumerate(prompts):
            ids = self.sequences[row][self.attention[row].bool()].tolist()
            if ids != list(prompt):
                raise ValueError(f"row {row}'s prompt is not the ids its decoding state holds")

    def grown(self, sequences: torch.Tensor, cache: Any) -> DecodeState:
        """The state after ``generate`` appended columns to ``sequences`` (every row's new
        ids count as read: rows that ended early are done and not gone on from)."""
        new = sequences.shape[1] - self.attention.shape[1]
        attention = self.attention.to(sequences.device)
        ones = attention.new_ones((self.rows, new))
        return DecodeState(sequences, torch.cat([attention, ones], dim=1), cache)


@dataclass
class KvCarry:
    """A decoding state handed to a backend (``state``: where to go on from) and back
    (``state``: where the call stopped; None if the backend keeps none)."""

    state: DecodeState | None = None
