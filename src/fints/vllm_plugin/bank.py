"""The worker side: a persistent vector bank and a per-token slot index.

One continuous batch mixes requests of many users. Each steered request owns a slot
of the bank (slot 0 is all zeros: unsteered); before every forward the slot index
of each scheduled token is written (:meth:`SteeringBank.update`), and one forward
hook per steered site adds ``table[index]`` to the module's output. When no row of
the batch is steered the hooks return at once.

Sites follow :mod:`fints.sites`: ``attn`` and ``mlp`` are the outputs of the
layer's attention and MLP modules; ``block`` is the layer's output. vLLM's decoder
layers return ``(hidden, residual)`` whose sum is the residual stream, so adding to
``hidden`` adds to the block's output.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fints.errors import InvalidInputError
from fints.injection import hidden_of, with_hidden
from fints.sites import Component, Site
from fints.vllm_plugin.packing import STEERING_KEY, unpack_steering

log = logging.getLogger(__name__)

#: vLLM architectures whose decoder layers sit at ``model.layers`` and have
#: ``self_attn`` and ``mlp`` modules (the layouts the transformers core knows as well).
SUPPORTED_ARCHITECTURES = frozenset(
    {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
)


def decoder_layers(model: nn.Module) -> dict[int, nn.Module]:
    """The decoder layers this worker holds, by index (pipeline stages hold a range)."""
    layers = model.get_submodule("model.layers")
    held = {}
    for i, layer in enumerate(layers.children()):
        if hasattr(layer, "self_attn") and hasattr(layer, "mlp"):
            held[i] = layer
    return held


def site_module(layers: Mapping[int, nn.Module], site: Site) -> nn.Module:
    layer = layers[site.layer]
    parts = {Component.ATTN: layer.self_attn, Component.MLP: layer.mlp, Component.BLOCK: layer}
    return parts[site.component]  # type: ignore[return-value]


@dataclass
class SteeringBank:
    """``tables[site]``: ``[slots, hidden]`` (row 0 zero); ``index``: each token's slot."""

    layers: Mapping[int, nn.Module]
    slots: int
    hidden: int
    dtype: torch.dtype
    device: torch.device
    tables: dict[Site, torch.Tensor] = field(default_factory=dict)
    slot_of: dict[str, int] = field(default_factory=dict)
    index: torch.Tensor | None = None  # None: no scheduled token is steered
    _free: list[int] = field(default_factory=list)
    _handles: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._free = list(range(self.slots - 1, 0, -1))

    def update(
        self,
        scheduled: Sequence[tuple[str, int, Mapping[str, Any] | None]],
        alive: Container[str],
    ) -> None:
        """Before a forward: ``scheduled`` is the batch in token order, per request its
        id, its number of tokens in this step and its ``extra_args``; ``alive`` the ids
        of every request the worker still holds (the others' slots are freed)."""
        for req_id in [r for r in self.slot_of if r not in alive]:
            self._release(req_id)
        slots = [self._slot(req_id, extra) for req_id, _, extra in scheduled]
        if not any(slots):
            self.index = None
            return
        counts = torch.tensor([n for _, n, _ in scheduled], dtype=torch.long)
        self.index = torch.repeat_interleave(torch.tensor(slots, dtype=torch.long), counts).to(
            self.device
        )

    def _slot(self, req_id: str, extra: Mapping[str, Any] | None) -> int:
        if req_id in self.slot_of:
            return self.slot_of[req_id]
        packed = (extra or {}).get(STEERING_KEY)
        if packed is None:
            return 0
        try:
            vectors = unpack_steering(packed)
            self._check(vectors)
        except InvalidInputError as exc:  # the client validates; never fail the engine
            log.error("request %s: steering ignored: %s", req_id, exc)
            return 0
        if not self._free:
            log.error("request %s: steering ignored: all %d slots in use", req_id, self.slots)
            return 0
        slot = self._free.pop()
        for site, vector in vectors.items():
            if site.layer in self.layers:  # another pipeline stage holds the others
                self._table(site)[slot] = vector.to(self.dtype)
        self.slot_of[req_id] = slot
        return slot

    def _check(self, vectors: Mapping[Site, torch.Tensor]) -> None:
        for site, vector in vectors.items():
            if vector.numel() != self.hidden:
                raise InvalidInputError(f"{site}: {vector.numel()} values, hidden is {self.hidden}")
            if not torch.isfinite(vector).all():
                raise InvalidInputError(f"{site}: NaN or inf")

    def _release(self, req_id: str) -> None:
        slot = self.slot_of.pop(req_id)
        for table in self.tables.values():
            table[slot].zero_()
        self._free.append(slot)

    def _table(self, site: Site) -> torch.Tensor:
        if site not in self.tables:
            table = torch.zeros(self.slots, self.hidden, dtype=self.dtype, device=self.device)
            self.tables[site] = table
            module = site_module(self.layers, site)
            self._handles.append(module.register_forward_hook(self._adder(table)))
        return self.tables[site]

    def _adder(self, table: torch.Tensor) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            index = self.index
            if index is None:
                return None
            hidden = hidden_of(output)
            rows = hidden.shape[0]
            added = table.index_select(0, index[:rows])
            if added.shape[0] < rows:  # padded tokens: unsteered
                added = torch.nn.functional.pad(added, (0, 0, 0, rows - added.shape[0]))
            return with_hidden(output, hidden + added)

        return hook

    def close(self) -> None:
        """Remove the hooks (the model is plain again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.tables.clear()
