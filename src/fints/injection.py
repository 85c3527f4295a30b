"""Adding steering vectors to a model's activations while it runs.

:func:`steer` registers one forward hook per site and removes them all on exit,
also when the body raises. Each hook adds a per-row vector (shape
``[batch, hidden]``) to every position of the module's output, so it acts on all
prompt tokens at prefill and on each new token at every decode step of a
KV-cached ``generate``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from fints.errors import InvalidInputError
from fints.layers import DecoderLayout
from fints.sites import Site


def hidden_of(output: Any) -> torch.Tensor:
    """A module's output tensor (the first element of a tuple output)."""
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its tensor (see :func:`hidden_of`) replaced by ``hidden``."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _adder(site: Site, vector: torch.Tensor) -> Any:
    cache: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        hidden = hidden_of(output)
        if vector.shape[0] not in (1, hidden.shape[0]):
            raise InvalidInputError(
                f"steering at {site}: {vector.shape[0]} vectors for a batch of "
                f"{hidden.shape[0]} rows (one vector per row, or one for all rows, is needed; "
                "beam search and num_return_sequences > 1 are not supported while steering)"
            )
        key = (hidden.dtype, hidden.device)
        if key not in cache:
            cache[key] = vector.to(dtype=hidden.dtype, device=hidden.device).unsqueeze(1)
        return with_hidden(output, hidden + cache[key])

    return hook


@contextmanager
def steer(layout: DecoderLayout, vectors: Mapping[Site, torch.Tensor]) -> Iterator[None]:
    """Add ``vectors[site]`` (``[batch, hidden]``, already scaled) at each site; a
    ``[1, hidden]`` vector is added to every row.

    Strengths are applied by the caller (see :func:`fints.steering.effective_vectors`),
    so the hook itself is a single addition.
    """
    handles = []
    try:
        for site, vector in vectors.items():
            if vector.dim() != 2:
                raise InvalidInputError(
                    f"steering vector for {site} must be [batch, hidden], got {tuple(vector.shape)}"
                )
            if not torch.isfinite(vector).all():
                raise InvalidInputError(f"steering vector for {site} contains NaN or inf")
            module = layout.module(site)
            handles.append(module.register_forward_hook(_adder(site, vector)))
        yield
    finally:
        for handle in handles:
            handle.remove()
