"""Extracting a user's steering dictionary from a frozen model.

Context contrast (the paper's): for each history item (x_i, y_i), the positive
prompt holds x_i with the user's own most relevant other items as context, the
negative prompt holds x_i with other users' items; both are teacher-forced on
y_i and the per-site mean activation over y_i's tokens is taken. The entry's
vector is mean(positive) - mean(negative).

Response contrast (the authors' code): one prompt with other users' context;
the gold y_i ("chosen") against a greedy generation of the model ("rejected"),
keeping items whose ROUGE-L between the two is below a threshold.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from rouge_score import rouge_scorer
from tqdm.auto import tqdm

from fints.dictionary import DictionaryEntry, DictionaryMeta
from fints.encoders import KeyEncoder
from fints.errors import InvalidInputError
from fints.history import HistoryItem
from fints.models import LoadedModel
from fints.prompts import PromptTemplate, build_prompt_ids, pad_batch
from fints.recording import record_means
from fints.sites import Site, check_layers_in_range
from fints.steering import SteeringVector

Contrast = Literal["context", "response"]
CONTRASTS: tuple[Contrast, ...] = get_args(Contrast)


@dataclass(frozen=True)
class ExtractionConfig:
    sites: tuple[Site, ...]
    contrast: Contrast = "context"
    context_k: int = 3  # the user's own items in the positive prompt
    negative_k: int = 3  # other users' items in the negative prompt
    batch_size: int = 8
    max_target_tokens: int = 160
    rouge_threshold: float = 0.15  # response contrast: keep pairs below this ROUGE-L
    rejected_max_new_tokens: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.contrast not in CONTRASTS:
            raise InvalidInputError(f"contrast must be one of {CONTRASTS}, got {self.contrast!r}")
        if self.batch_size < 1 or self.context_k < 0 or self.negative_k < 0:
            raise InvalidInputError("batch_size must be >= 1 and context_k, negative_k >= 0")


@dataclass
class ExtractionResult:
    meta: DictionaryMeta
    entries: list[DictionaryEntry]
    positive: torch.Tensor  # [N, sites, hidden] mean activations, positive side
    negative: torch.Tensor  # [N, sites, hidden] mean activations, negative side
    skipped: list[str]  # item ids left out (response contrast filter)

    @property
    def differences(self) -> torch.Tensor:
        return self.positive - self.negative


def _item_rng(seed: int, item_id: str) -> random.Random:
    return random.Random(int(hashlib.sha256(f"{seed}:{item_id}".encode()).hexdigest()[:12], 16))


class Extractor:
    """Builds dictionary entries for one model, key encoder and prompt template."""

    def __init__(
        self,
        model: LoadedModel,
        encoder: KeyEncoder,
        template: PromptTemplate,
        config: ExtractionConfig,
    ) -> None:
        check_layers_in_range(config.sites, model.num_layers)
        self.model, self.encoder, self.template, self.config = model, encoder, template, config

    def _own_context(
        self, items: Sequence[HistoryItem], history: Sequence[HistoryItem]
    ) -> list[list[HistoryItem]]:
        """For each item, the user's most similar other history items (by key cosine)."""
        k = self.config.context_k
        if k == 0 or len(history) < 2:
            return [[] for _ in items]
        item_keys = self.encoder.encode([i.input for i in items])
        history_keys = self.encoder.encode([h.input for h in history])
        scores = item_keys @ history_keys.T
        history_ids = [h.item_id for h in history]
        for row, item in enumerate(items):
            if item.item_id in history_ids:
                scores[row, history_ids.index(item.item_id)] = float("-inf")
        top = scores.topk(min(k, len(history) - 1), dim=1).indices
        return [[history[j] for j in row.tolist()] for row in top]

    def _negative_context(
        self, item: HistoryItem, pool: Sequence[HistoryItem]
    ) -> list[HistoryItem]:
        k = min(self.config.negative_k, len(pool))
        return _item_rng(self.config.seed, item.item_id).sample(list(pool), k) if k else []

    def _target_ids(self, item: HistoryItem) -> list[int]:
        ids = self.model.tokenizer(item.output, add_special_tokens=False)["input_ids"]
        return list(ids)[: self.config.max_target_tokens]

    def _means(
        self, prompts: list[list[int]], targets: list[list[int]]
    ) -> tuple[torch.Tensor, ...]:
        """Teacher-force each target after its prompt; mean over target tokens per site."""
        sequences = [p + t for p, t in zip(prompts, targets, strict=True)]
        tok = self.model.tokenizer
        input_ids, attention = pad_batch(sequences, tok.pad_token_id, side="right")
        token_mask = torch.zeros_like(attention, dtype=torch.bool)
        for row, (p, t) in enumerate(zip(prompts, targets, strict=True)):
            token_mask[row, len(p) : len(p) + len(t)] = True
        device = self.model.device
        recorded = record_means(
            self.model.model,
            self.model.layout,
            self.config.sites,
            input_ids.to(device),
            attention.to(device),
            token_mask.to(device),
        )
        return recorded.means, recorded.norms

    @torch.inference_mode()
    def _rejected(self, prompts: list[list[int]], targets: list[list[int]]) -> list[str]:
        tok = self.model.tokenizer
        input_ids, attention = pad_batch(prompts, tok.pad_token_id, side="left")
        limit = min(self.config.rejected_max_new_tokens, max(len(t) for t in targets) + 8)
        out = self.model.model.generate(  # type: ignore[operator]
            input_ids=input_ids.to(self.model.device),
            attention_mask=attention.to(self.model.device),
            max_new_tokens=limit,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        return tok.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)

    def extract(
        self,
        items: Sequence[HistoryItem],
        history: Sequence[HistoryItem],
        negative_pool: Sequence[HistoryItem],
        *,
        progress: bool = True,
    ) -> ExtractionResult:
        """Entries for ``items``; own context comes from ``history`` (the user's items)."""
        if not items:
            raise InvalidInputError("no history items to extract from")
        cfg, tok = self.config, self.model.tokenizer
        own = self._own_context(items, history)
        keys = self.encoder.encode([i.input for i in items])
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        pos_all, neg_all, norms_all, kept = [], [], [], []
        skipped: list[str] = []
        bar = tqdm(
            total=len(items),
            desc=f"extracting ({cfg.contrast} contrast)",
            unit="item",
            disable=not progress,
        )
        for start in range(0, len(items), cfg.batch_size):
            chunk = list(range(start, min(start + cfg.batch_size, len(items))))
            targets = [self._target_ids(items[i]) for i in chunk]
            negative_prompts = [
                build_prompt_ids(
                    tok,
                    self.template,
                    items[i].input,
                    self._negative_context(items[i], negative_pool),
                )
                for i in chunk
            ]
            if cfg.contrast == "context":
                positive_prompts = [
                    build_prompt_ids(tok, self.template, items[i].input, own[i]) for i in chunk
                ]
                means, norms = self._means(positive_prompts + negative_prompts, targets + targets)
                n = len(chunk)
                pos_all.append(means[:n])
                neg_all.append(means[n:])
                norms_all.append(norms[:n])
                kept.extend(chunk)
            else:
                rejected = self._rejected(negative_prompts, targets)
                keep = [
                    j
                    for j, i in enumerate(chunk)
                    if rejected[j].strip()
                    and scorer.score(items[i].output, rejected[j])["rougeL"].fmeasure
                    < cfg.rouge_threshold
                ]
                skipped.extend(items[chunk[j]].item_id for j in range(len(chunk)) if j not in keep)
                if keep:
                    prompts = [negative_prompts[j] for j in keep]
                    rejected_ids = [
                        list(tok(rejected[j], add_special_tokens=False)["input_ids"])[
                            : cfg.max_target_tokens
                        ]
                        for j in keep
                    ]
                    means, norms = self._means(
                        prompts + prompts, [targets[j] for j in keep] + rejected_ids
                    )
                    pos_all.append(means[: len(keep)])
                    neg_all.append(means[len(keep) :])
                    norms_all.append(norms[: len(keep)])
                    kept.extend(chunk[j] for j in keep)
            bar.update(len(chunk))
        bar.close()
        hidden = self.model.hidden_size
        empty = torch.zeros(0, len(cfg.sites), hidden)
        positive = torch.cat(pos_all) if pos_all else empty
        negative = torch.cat(neg_all) if neg_all else empty
        site_norms = torch.cat(norms_all).mean(dim=0) if norms_all else torch.zeros(len(cfg.sites))
        meta = DictionaryMeta(
            model_fingerprint=self.model.fingerprint,
            model_name=self.model.name,
            sites=cfg.sites,
            hidden_size=hidden,
            key_encoder=self.encoder.name,
            key_dim=self.encoder.dim,
            prompt_template=self.template.name,
            dtype=str(self.model.dtype).removeprefix("torch."),
            contrast=cfg.contrast,
            site_norms=tuple(float(x) for x in site_norms),
        )
        differences = positive - negative
        entries = [
            DictionaryEntry(items[i].item_id, keys[i], SteeringVector(cfg.sites, differences[n]))
            for n, i in enumerate(kept)
        ]
        return ExtractionResult(meta, entries, positive, negative, skipped)
