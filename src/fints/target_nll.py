"""Teacher-forced NLL of target tokens after a prompt, optionally steered.

:func:`target_nll` is the per-example mean per-token negative log-likelihood
(nats/token) of each target token list following its prompt. Rows are right
padded; logits are computed only at the positions that predict a target token.

The same machinery serves the vector trainer (:mod:`fints.vector_training`):
:func:`capture_below` runs the layers below the lowest steered layer once, without
gradients, and keeps what the upper layers are called with (the hidden state, the
attention mask, the rotary embeddings, ...), so :func:`upper_nll` can rerun only the
layers from there up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fints.errors import InvalidInputError
from fints.injection import steer
from fints.models import LoadedModel
from fints.prompts import pad_batch
from fints.sites import Site

#: Architectures whose causal LM is ``model.model`` (embeddings, ``layers``, final
#: ``norm``) plus a plain ``lm_head``: hidden states can be taken from the base model
#: and the upper layers rerun from a cached input. Others use the full forward pass.
LLAMA_LIKE = frozenset({"llama", "qwen2", "qwen3", "mistral"})

Example = tuple[Sequence[int], Sequence[int]]  # (prompt token ids, target token ids)


def is_llama_like(model: LoadedModel) -> bool:
    config = getattr(model.model, "config", None)
    base = getattr(model.model, "model", None)
    return (
        getattr(config, "model_type", None) in LLAMA_LIKE
        and isinstance(getattr(base, "norm", None), nn.Module)
        and isinstance(getattr(model.model, "lm_head", None), nn.Linear)
    )


@dataclass
class PackedBatch:
    """Right-padded rows of ``prompt + target[:-1]`` and where each target token is predicted.

    ``rows[k], cols[k]`` is the position whose logits predict ``labels[k]``; ``owner[k]``
    is the example (row) that token belongs to; ``counts[b]`` is row ``b``'s token count.
    """

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    rows: torch.Tensor  # [K]
    cols: torch.Tensor  # [K]
    labels: torch.Tensor  # [K]
    counts: torch.Tensor  # [B] float32

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    def per_example(self, token_nll: torch.Tensor) -> torch.Tensor:
        """Mean over each row's target tokens: ``[K] -> [B]``."""
        sums = torch.zeros(self.size, dtype=token_nll.dtype, device=token_nll.device)
        sums = sums.index_add(0, self.rows.to(token_nll.device), token_nll)
        return sums / self.counts.to(token_nll.device, token_nll.dtype)


def pack(
    examples: Sequence[Example], pad_id: int, *, max_target_tokens: int | None = None
) -> PackedBatch:
    """Pack (prompt, target) pairs; targets are cut to ``max_target_tokens`` if given."""
    if not examples:
        raise InvalidInputError("no examples to pack")
    sequences: list[list[int]] = []
    rows: list[int] = []
    cols: list[int] = []
    labels: list[int] = []
    counts: list[float] = []
    for b, (prompt, target) in enumerate(examples):
        target = list(target)[:max_target_tokens] if max_target_tokens else list(target)
        if not prompt or not target:
            raise InvalidInputError(
                f"example {b}: prompt and target must each hold at least one token"
            )
        sequences.append([*prompt, *target[:-1]])
        start = len(prompt) - 1
        rows.extend([b] * len(target))
        cols.extend(range(start, start + len(target)))
        labels.extend(target)
        counts.append(float(len(target)))
    ids, mask = pad_batch(sequences, pad_id, side="right")
    return PackedBatch(
        input_ids=ids,
        attention_mask=mask,
        position_ids=(mask.cumsum(dim=1) - 1).clamp_min(0),
        rows=torch.tensor(rows, dtype=torch.long),
        cols=torch.tensor(cols, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        counts=torch.tensor(counts, dtype=torch.float32),
    )


def _token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.float(), labels.to(logits.device), reduction="none")


def _head(model: LoadedModel, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Final norm and ``lm_head`` at the target positions only; per-example NLL ``[B]``."""
    device = hidden.device
    picked = hidden[batch.rows.to(device), batch.cols.to(device)]
    logits = model.model.lm_head(model.model.model.norm(picked))
    return batch.per_example(_token_nll(logits, batch.labels))


def _inputs(model: LoadedModel, batch: PackedBatch) -> dict[str, Any]:
    device = model.device
    return {
        "input_ids": batch.input_ids.to(device),
        "attention_mask": batch.attention_mask.to(device),
        "position_ids": batch.position_ids.to(device),
        "use_cache": False,
    }


def forward_nll(
    model: LoadedModel, batch: PackedBatch, vectors: Mapping[Site, torch.Tensor] | None = None
) -> torch.Tensor:
    """Per-example mean NLL ``[B]`` of one packed batch through the whole network.

    Llama-like models: hidden states from the base model, then ``lm_head`` at the target
    positions only. Others: the full causal LM (all logits), then the target positions.
    """
    inputs = _inputs(model, batch)
    with steer(model.layout, vectors or {}):
        if is_llama_like(model):
            hidden = model.model.model(**inputs).last_hidden_state  # already normed
            d = hidden.device
            logits = model.model.lm_head(hidden[batch.rows.to(d), batch.cols.to(d)])
        else:
            logits_all = model.model(**inputs).logits
            d = logits_all.device
            logits = logits_all[batch.rows.to(d), batch.cols.to(d)]
    return batch.per_example(_token_nll(logits, batch.labels))


def _rows(vectors: Mapping[Site, torch.Tensor] | None, index: torch.Tensor, n: int) -> Any:
    if not vectors:
        return None
    out = {}
    for site, v in vectors.items():
        if v.dim() != 2 or v.shape[0] not in (1, n):
            raise InvalidInputError(
                f"steering vectors for {site} must be [{n}, hidden] or [1, hidden], "
                f"got {tuple(v.shape)}"
            )
        out[site] = v.expand(len(index), -1) if v.shape[0] == 1 else v[index.to(v.device)]
    return out


@torch.no_grad()
def target_nll(
    model: LoadedModel,
    prompts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    vectors: Mapping[Site, torch.Tensor] | None = None,
    *,
    batch_size: int = 8,
) -> torch.Tensor:
    """Mean per-token NLL (nats/token) of ``targets[i]`` teacher-forced after ``prompts[i]``.

    ``vectors[site]`` is ``[len(prompts), hidden]`` (one row per example) or ``[1, hidden]``
    (the same for all), added at every position via :func:`fints.injection.steer`.
    Returns a float32 tensor ``[len(prompts)]`` on the CPU.
    """
    if len(prompts) != len(targets):
        raise InvalidInputError(f"{len(prompts)} prompts but {len(targets)} targets")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    n = len(prompts)
    out = torch.empty(n, dtype=torch.float32)
    # longest first, so rows of one batch have similar lengths (little padding)
    order = sorted(range(n), key=lambda i: -(len(prompts[i]) + len(targets[i])))
    pad_id = model.tokenizer.pad_token_id or 0
    for start in range(0, n, batch_size):
        index = torch.tensor(order[start : start + batch_size], dtype=torch.long)
        batch = pack([(prompts[i], targets[i]) for i in index.tolist()], pad_id)
        out[index] = forward_nll(model, batch, _rows(vectors, index, n)).float().cpu()
    return out


# -- the cached path: rerun only the layers from the lowest steered one up ----------------


class _Stop(Exception):
    """Raised by a capture hook once everything the upper layers need is kept."""


@dataclass
class UpperState:
    """What layers ``lowest..`` were called with in an unsteered pass (no gradients).

    ``hidden`` enters layer ``lowest``; ``calls[j]`` holds the other positional and the
    keyword arguments of layer ``lowest + j`` (attention mask, position embeddings, ...).
    """

    lowest: int
    hidden: torch.Tensor
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]]
    by_keyword: bool  # the hidden state was passed as ``hidden_states=``


def _uniform_above(model: LoadedModel, lowest: int) -> bool:
    """Whether all layers from ``lowest`` up get the same arguments (one mask type)."""
    layer_types = getattr(model.model.config, "layer_types", None)
    return not layer_types or len(set(layer_types[lowest:])) == 1


@torch.no_grad()
def capture_below(model: LoadedModel, batch: PackedBatch, lowest: int) -> UpperState:
    """Run the layers below ``lowest`` once and keep what the upper layers are called with.

    Only for llama-like models (:func:`is_llama_like`). When all upper layers get the same
    arguments the pass stops at layer ``lowest``; otherwise it runs on to the last layer
    to record each one's (e.g. sliding-window and full-attention masks).
    """
    layers = model.layout.layers
    uniform = _uniform_above(model, lowest)
    last = lowest if uniform else len(layers) - 1
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    kept: dict[str, Any] = {}

    def make_hook(index: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            kwargs = dict(kwargs)
            if index == lowest:
                kept["by_keyword"] = not args
                kept["hidden"] = args[0] if args else kwargs.pop("hidden_states")
            else:
                kwargs.pop("hidden_states", None)
            calls.append((tuple(args[1:]), kwargs))
            if index == last:
                raise _Stop

        return hook

    handles = [
        layers[i].register_forward_pre_hook(make_hook(i), with_kwargs=True)
        for i in range(lowest, last + 1)
    ]
    try:
        model.model.model(**_inputs(model, batch))
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if "hidden" not in kept:
        raise InvalidInputError(f"layer {lowest} was never called: cannot cache its input")
    if uniform:
        calls = calls * (len(layers) - lowest)
    return UpperState(lowest, kept["hidden"].detach(), calls, kept["by_keyword"])


def upper_nll(
    model: LoadedModel,
    batch: PackedBatch,
    state: UpperState,
    vectors: Mapping[Site, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-example mean NLL ``[B]``, rerunning only layers ``state.lowest..`` (steered), the
    final norm and ``lm_head`` at the target positions. Gradients flow to ``vectors``."""
    if vectors and min(site.layer for site in vectors) < state.lowest:
        raise InvalidInputError(f"a site below layer {state.lowest} cannot use this cache")
    layers = model.layout.layers
    hidden = state.hidden
    with steer(model.layout, vectors or {}):
        for layer, (args, kwargs) in zip(layers[state.lowest :], state.calls, strict=True):
            if state.by_keyword:
                out = layer(*args, hidden_states=hidden, **kwargs)
            else:
                out = layer(hidden, *args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
    return _head(model, hidden, batch)
