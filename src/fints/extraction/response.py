"""Response contrast (the authors' code): the user's output against the model's own.

One prompt per item (the input with other users' items as context); the gold output
("chosen") against the model's greedy answer ("rejected"), both teacher-forced,
keeping items whose ROUGE-L between the two is below a threshold. A generation per
item, then two forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rouge_score import rouge_scorer

from fints.errors import InvalidInputError
from fints.extraction.base import (
    ExtractionJob,
    MethodConfig,
    MethodContext,
    Sides,
    register,
)
from fints.prompts import build_prompt_ids, pad_batch


@dataclass(frozen=True)
class ResponseContrastConfig(MethodConfig):
    name = "response"

    negative_k: int = 3  # other users' items in the shared prompt
    rouge_threshold: float = 0.15  # keep pairs whose ROUGE-L is below this
    rejected_max_new_tokens: int = 64

    def __post_init__(self) -> None:
        if self.negative_k < 0 or self.rejected_max_new_tokens < 1:
            raise InvalidInputError("negative_k must be >= 0 and rejected_max_new_tokens >= 1")


@torch.inference_mode()
def _greedy(context: MethodContext, prompts: list[list[int]], limit: int) -> list[str]:
    model, tok = context.model, context.model.tokenizer
    input_ids, attention = pad_batch(prompts, tok.pad_token_id, side="left")
    out = model.model.generate(  # type: ignore[operator]
        input_ids=input_ids.to(model.device),
        attention_mask=attention.to(model.device),
        max_new_tokens=limit,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    return tok.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)


def response_contrast(
    context: MethodContext, config: ResponseContrastConfig, job: ExtractionJob
) -> Sides:
    items, tok, template = job.items, context.model.tokenizer, context.template
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    kept: list[int] = []
    positive, negative, norms = [], [], []
    skipped: list[str] = []
    for chunk in context.chunks(len(items)):
        targets = [context.target_ids(items[i].output) for i in chunk]
        prompts = [
            build_prompt_ids(
                tok,
                template,
                items[i].input,
                context.negative_context(items[i], job.pool, config.negative_k),
            )
            for i in chunk
        ]
        limit = min(config.rejected_max_new_tokens, max(len(t) for t in targets) + 8)
        rejected = _greedy(context, prompts, limit)
        keep = [
            j
            for j, i in enumerate(chunk)
            if rejected[j].strip()
            and scorer.score(items[i].output, rejected[j])["rougeL"].fmeasure
            < config.rouge_threshold
        ]
        skipped.extend(items[chunk[j]].item_id for j in range(len(chunk)) if j not in keep)
        if keep:
            kept_prompts = [prompts[j] for j in keep]
            rejected_ids = [context.target_ids(rejected[j]) for j in keep]
            means, seen = context.means(
                kept_prompts + kept_prompts, [targets[j] for j in keep] + rejected_ids
            )
            positive.append(means[: len(keep)])
            negative.append(means[len(keep) :])
            norms.append(seen[: len(keep)])
            kept.extend(chunk[j] for j in keep)
        context.advance(len(chunk))
    empty = torch.zeros(0, len(context.sites), context.model.hidden_size)
    return Sides(
        kept=kept,
        positive=torch.cat(positive) if positive else empty,
        negative=torch.cat(negative) if negative else empty,
        norms=torch.cat(norms) if norms else torch.zeros(0, len(context.sites)),
        skipped=skipped,
    )


register(ResponseContrastConfig, response_contrast)
