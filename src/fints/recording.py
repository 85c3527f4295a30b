"""Recording mean activations per site over a token mask (e.g. the response tokens)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fints.layers import DecoderLayout
from fints.sites import Site


@dataclass
class SiteMeans:
    """Masked means per row and site.

    ``means[b, s]`` is the mean activation of row ``b`` at ``sites[s]`` over the
    masked tokens; ``norms[b, s]`` is the mean L2 norm of those activations (the
    site's typical activation size, used for norm-relative strengths).
    """

    sites: tuple[Site, ...]
    means: torch.Tensor  # [batch, sites, hidden], float32
    norms: torch.Tensor  # [batch, sites], float32


@contextmanager
def _recording(
    layout: DecoderLayout, sites: Sequence[Site], mask: torch.Tensor
) -> Iterator[dict[Site, tuple[torch.Tensor, torch.Tensor]]]:
    weights = mask.to(torch.float32)
    counts = weights.sum(dim=1, keepdim=True).clamp_min(1.0)
    results: dict[Site, tuple[torch.Tensor, torch.Tensor]] = {}

    def make_hook(site: Site) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            hidden = (output[0] if isinstance(output, tuple) else output).to(torch.float32)
            w = weights.to(hidden.device).unsqueeze(-1)
            mean = (hidden * w).sum(dim=1) / counts.to(hidden.device)
            norm = (hidden.norm(dim=-1, keepdim=True) * w).sum(dim=1) / counts.to(hidden.device)
            results[site] = (mean, norm.squeeze(-1))

        return hook

    handles = [layout.module(site).register_forward_hook(make_hook(site)) for site in sites]
    try:
        yield results
    finally:
        for handle in handles:
            handle.remove()


class _StopForward(Exception):
    """Raised after the deepest recorded layer: the rest of the network is not needed."""


@contextmanager
def _stop_after(module: nn.Module) -> Iterator[None]:
    def hook(_module: nn.Module, _inputs: Any, _output: Any) -> None:
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield
    except _StopForward:
        pass
    finally:
        handle.remove()


@torch.inference_mode()
def record_means(
    model: nn.Module,
    layout: DecoderLayout,
    sites: Sequence[Site],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_mask: torch.Tensor,
) -> SiteMeans:
    """One forward pass; returns the mean activation over ``token_mask`` at each site.

    The forward pass stops after the deepest recorded layer. Padding tokens must
    be outside ``token_mask``. Position ids are derived from
    the attention mask, so left- and right-padded batches both give each row the
    positions it would have alone.
    """
    position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)
    deepest = layout.layers[max(site.layer for site in sites)]
    with (
        _recording(layout, sites, token_mask & attention_mask.bool()) as results,
        _stop_after(deepest),
    ):
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    means = torch.stack([results[s][0] for s in sites], dim=1).cpu()
    norms = torch.stack([results[s][1] for s in sites], dim=1).cpu()
    return SiteMeans(sites=tuple(sites), means=means, norms=norms)
