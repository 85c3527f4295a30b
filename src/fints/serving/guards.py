"""Guards of the model worker: a row whose steering overflows fails alone.

:func:`nonfinite_rows` finds rows whose vectors are NaN or inf before decoding;
:class:`FiniteGuard` ends a row whose logits overflow while decoding, leaving the
other rows' scores exactly as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor

from fints.engine import PreparedBatch
from fints.generation import Decoration
from fints.serving.api_errors import ApiError


def overflow(what: str) -> ApiError:
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


def queue_full(max_queue: int) -> ApiError:
    """The 503 for a request beyond ``max_queue`` requests waiting or in progress."""
    return ApiError(
        503,
        f"the server is overloaded ({max_queue} requests waiting, the limit max_queue); "
        "retry later",
        type="overloaded_error",
        param="max_queue",
        code="queue_full",
        headers={"retry-after": "1"},
    )


def refusals(
    prepared: PreparedBatch, raw: Sequence[bool], max_prompt_tokens: int
) -> dict[int, ApiError]:
    """The rows that must fail alone before decoding: a prompt over ``max_prompt_tokens``
    (``raw[row]``: the prompt is the request's raw text), or NaN/inf steering vectors."""
    refused: dict[int, ApiError] = {}
    for i, ids in enumerate(prepared.prompts):
        if len(ids) > max_prompt_tokens:
            refused[i] = ApiError(
                400,
                f"the prompt is {len(ids)} tokens long; this server accepts at most "
                f"{max_prompt_tokens}",
                param="prompt" if raw[i] else "messages",
                code="context_length_exceeded",
            )
    for i, sites in nonfinite_rows(prepared).items():
        refused.setdefault(i, overflow(f"its steering vectors are NaN or inf at {sites}"))
    return refused


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
