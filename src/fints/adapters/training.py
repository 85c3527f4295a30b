"""Training LoRA adapters with PEFT: a tenant's task adapter on all users' histories,
and per-user adapters on top of it (OPPU).

The prompts are the ones generation uses (:func:`fints.prompts.build_prompt_ids` with
the same template, no in-context examples); the loss is the mean NLL of the output
tokens only (the prompt is context, never a target). Training runs on a copy of the
model, so the model being served is never touched.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from peft import (
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.tuners.lora import LoraLayer
from torch import nn

from fints.adapters.config import LoraTrainConfig
from fints.adapters.files import AdapterError, AdapterWeights, lora_config
from fints.adapters.host import lora_layers
from fints.errors import InvalidInputError
from fints.history import HistoryItem
from fints.layers import resolve_layout
from fints.models import LoadedModel
from fints.prompts import PromptTemplate, build_prompt_ids
from fints.target_nll import Example, forward_nll, pack

#: Called after every optimizer step with (steps done, that step's loss).
OnStep = Callable[[int, float], object]


@dataclass(frozen=True)
class TrainedAdapter:
    weights: AdapterWeights
    seconds: float
    epoch_losses: tuple[float, ...]  # mean training loss of each epoch
    items: int
    steps: int


def training_examples(
    model: LoadedModel, template: PromptTemplate, items: Sequence[HistoryItem], max_target: int
) -> list[Example]:
    """Each item as (prompt ids, output ids): the output cut to ``max_target`` tokens and,
    when it fits, ended by the end-of-turn token (the adapter learns where to stop)."""
    tok = model.tokenizer
    examples: list[Example] = []
    for item in items:
        prompt = build_prompt_ids(tok, template, item.input)
        ids = list(tok(item.output, add_special_tokens=False)["input_ids"])
        if tok.eos_token_id is not None and len(ids) < max_target:
            ids.append(int(tok.eos_token_id))
        examples.append((prompt, ids[:max_target]))
    return examples


def _strip_lora(model: nn.Module) -> None:
    """Put back the base layers of any LoRA layers in ``model`` (a copy of a served model
    may hold the adapters loaded for serving)."""
    for name, module in list(model.named_modules()):
        if "." not in name or not isinstance(module, LoraLayer):
            continue
        parent_name, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), child, module.get_base_layer())


class LoraTrainer:
    """Trains adapters on a private copy of ``model`` (with ``task`` merged into it, if
    given: per-user adapters learn what the task adapter did not)."""

    def __init__(self, model: LoadedModel, task: AdapterWeights | None = None) -> None:
        work = copy.deepcopy(model.model)
        _strip_lora(work)
        if task is not None:
            inject_adapter_in_model(task.config, work, adapter_name="task")
            result: Any = set_peft_model_state_dict(work, task.model_state(), adapter_name="task")
            if result.unexpected_keys:
                raise AdapterError(f"the task adapter does not fit: {result.unexpected_keys[:2]}")
            for layer in lora_layers(work):
                layer.merge(adapter_names=["task"])
            _strip_lora(work)
            if hasattr(work, "peft_config"):
                del work.peft_config
        work.requires_grad_(False)
        self.base = model
        self.work = replace(model, model=work, layout=resolve_layout(work))
        self.task = task

    def train(
        self,
        examples: Sequence[Example],
        config: LoraTrainConfig,
        *,
        on_step: OnStep | None = None,
    ) -> TrainedAdapter:
        if not examples:
            raise InvalidInputError("no history items to train an adapter on")
        start = time.perf_counter()
        torch.manual_seed(config.seed)
        peft_model = get_peft_model(self.work.model, lora_config(config, self.base.name))
        try:
            params = [p for p in peft_model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
            pad = self.base.tokenizer.pad_token_id or 0
            order, rng = list(range(len(examples))), random.Random(config.seed)
            peft_model.train()
            losses, steps = [], 0
            for _ in range(config.epochs):
                rng.shuffle(order)
                total, tokens = 0.0, 0.0
                for at in range(0, len(order), config.batch_size):
                    batch = pack([examples[i] for i in order[at : at + config.batch_size]], pad)
                    per_example = forward_nll(self.work, batch)
                    counts = batch.counts.to(per_example.device)
                    loss = (per_example * counts).sum() / counts.sum()
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    steps += 1
                    total += loss.item() * float(counts.sum())
                    tokens += float(counts.sum())
                    if on_step is not None:
                        on_step(steps, loss.item())
                losses.append(total / tokens)
            state = {
                k: v.detach().cpu().clone()
                for k, v in get_peft_model_state_dict(peft_model).items()
            }
        finally:
            peft_model.unload()
            if hasattr(self.work.model, "peft_config"):
                del self.work.model.peft_config  # the next get_peft_model starts afresh
            self.work.model.eval()
            self.work.model.requires_grad_(False)
        weights = AdapterWeights(lora_config(config, self.base.name, inference=True), state)
        return TrainedAdapter(
            weights, time.perf_counter() - start, tuple(losses), len(examples), steps
        )
