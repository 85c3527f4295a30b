"""Context contrast (the paper's): the user's own context against other users'.

For each item (x, y), the positive prompt holds x with the user's most similar other
items as context, the negative prompt holds x with other users' items; both are
teacher-forced on y, and the entry is the difference of the per-site mean
activations over y's tokens. Two forward passes per item.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fints.errors import InvalidInputError
from fints.extraction.base import (
    ExtractionJob,
    MethodConfig,
    MethodContext,
    Sides,
    register,
)
from fints.history import HistoryItem
from fints.prompts import build_prompt_ids


@dataclass(frozen=True)
class ContextContrastConfig(MethodConfig):
    name = "context"

    context_k: int = 3  # the user's own items in the positive prompt
    negative_k: int = 3  # other users' items in the negative prompt

    def __post_init__(self) -> None:
        if self.context_k < 0 or self.negative_k < 0:
            raise InvalidInputError("context_k and negative_k must be >= 0")


def own_context(
    context: MethodContext,
    items: Sequence[HistoryItem],
    history: Sequence[HistoryItem],
    k: int,
) -> list[list[HistoryItem]]:
    """For each item, the user's ``k`` most similar other history items (by key cosine)."""
    if k == 0 or len(history) < 2:
        return [[] for _ in items]
    scores = (
        context.encoder.encode([i.input for i in items])
        @ context.encoder.encode([h.input for h in history]).T
    )
    history_ids = [h.item_id for h in history]
    for row, item in enumerate(items):
        if item.item_id in history_ids:
            scores[row, history_ids.index(item.item_id)] = float("-inf")
    top = scores.topk(min(k, len(history) - 1), dim=1).indices
    return [[history[j] for j in row.tolist()] for row in top]


def context_contrast(
    context: MethodContext, config: ContextContrastConfig, job: ExtractionJob
) -> Sides:
    items, tok, template = job.items, context.model.tokenizer, context.template
    own = own_context(context, items, job.history, config.context_k)
    positive, negative, norms = [], [], []
    for chunk in context.chunks(len(items)):
        targets = [context.target_ids(items[i].output) for i in chunk]
        positive_prompts = [build_prompt_ids(tok, template, items[i].input, own[i]) for i in chunk]
        negative_prompts = [
            build_prompt_ids(
                tok,
                template,
                items[i].input,
                context.negative_context(items[i], job.pool, config.negative_k),
            )
            for i in chunk
        ]
        means, seen = context.means(positive_prompts + negative_prompts, targets + targets)
        n = len(chunk)
        positive.append(means[:n])
        negative.append(means[n:])
        norms.append(seen[:n])
        context.advance(n)
    return Sides(
        kept=list(range(len(items))),
        positive=torch.cat(positive),
        negative=torch.cat(negative),
        norms=torch.cat(norms),
        skipped=[],
    )


register(ContextContrastConfig, context_contrast)
