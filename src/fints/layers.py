"""Find a model's decoder layers and their attention and MLP submodules.

Known architectures are listed in :data:`KNOWN_LAYOUTS`; anything else can be
described with a :class:`LayerPaths` naming the modules by their dotted paths.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fints.errors import UnsupportedModelError
from fints.sites import Component, Site


@dataclass(frozen=True)
class LayerPaths:
    """Where the decoder layers live, relative to the model, and what their parts are called."""

    layers: str  # dotted path of the ModuleList of decoder layers, e.g. "model.layers"
    attn: str  # attribute of one layer holding the attention block, e.g. "self_attn"
    mlp: str  # attribute of one layer holding the MLP block, e.g. "mlp"


_LLAMA_LIKE = LayerPaths("model.layers", "self_attn", "mlp")

KNOWN_LAYOUTS: dict[str, LayerPaths] = {
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "gemma3": LayerPaths("model.language_model.layers", "self_attn", "mlp"),
    "phi3": _LLAMA_LIKE,
    "gpt2": LayerPaths("transformer.h", "attn", "mlp"),
}


@dataclass(frozen=True)
class DecoderLayout:
    """The resolved modules of one model: ``layers[i]``, ``attn[i]``, ``mlp[i]``."""

    layers: tuple[nn.Module, ...]
    attn: tuple[nn.Module, ...]
    mlp: tuple[nn.Module, ...]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def module(self, site: Site) -> nn.Module:
        if site.layer >= self.num_layers:
            raise UnsupportedModelError(
                f"site {site} is out of range: the model has {self.num_layers} layers"
            )
        table = {Component.ATTN: self.attn, Component.MLP: self.mlp, Component.BLOCK: self.layers}
        return table[site.component][site.layer]


def _get(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def resolve_layout(model: nn.Module, paths: LayerPaths | None = None) -> DecoderLayout:
    """Resolve the decoder layout of ``model`` (a transformers causal LM or any nn.Module)."""
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    chosen = paths or KNOWN_LAYOUTS.get(model_type)
    how_to = (
        "Name the modules yourself, e.g. "
        "LayerPaths(layers='model.layers', attn='self_attn', mlp='mlp') in Python or "
        "--layers-path model.layers --attn-name self_attn --mlp-name mlp on the command line. "
        f"Known model types: {sorted(KNOWN_LAYOUTS)}."
    )
    if chosen is None:
        raise UnsupportedModelError(f"fints does not know model type {model_type!r}. {how_to}")
    try:
        layers: tuple[nn.Module, ...] = tuple(_get(model, chosen.layers).children())
        attn = tuple(_get(layer, chosen.attn) for layer in layers)
        mlp = tuple(_get(layer, chosen.mlp) for layer in layers)
    except (AttributeError, TypeError) as exc:
        raise UnsupportedModelError(
            f"could not resolve {chosen} on model type {model_type!r}: {exc}. {how_to}"
        ) from None
    if not layers:
        raise UnsupportedModelError(
            f"{chosen.layers!r} on {model_type!r} holds no layers. {how_to}"
        )
    return DecoderLayout(layers=layers, attn=attn, mlp=mlp)
