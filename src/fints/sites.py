"""Steering sites: where in the network a vector is recorded and added.

A site is one (layer, component) pair. Components:

* ``attn``  - the attention block's output (after ``o_proj``, before the residual add)
* ``mlp``   - the MLP block's output (after ``down_proj``, before the residual add)
* ``block`` - the decoder layer's output, i.e. the residual stream after the layer
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from fints.errors import InvalidInputError


class Component(StrEnum):
    ATTN = "attn"
    MLP = "mlp"
    BLOCK = "block"


@dataclass(frozen=True, order=True)
class Site:
    layer: int
    component: Component

    def __post_init__(self) -> None:
        if not isinstance(self.layer, int) or self.layer < 0:
            raise InvalidInputError(
                f"site layer must be a non-negative integer, got {self.layer!r}"
            )
        object.__setattr__(self, "component", parse_component(self.component))

    def __str__(self) -> str:
        return f"{self.layer}.{self.component.value}"

    @classmethod
    def parse(cls, text: str) -> Site:
        """Parse ``"12.attn"`` (also ``"12:mlp"``)."""
        layer, sep, comp = text.strip().replace(":", ".").partition(".")
        if not sep or not layer.isdigit():
            raise InvalidInputError(
                f"cannot parse site {text!r}: expected LAYER.COMPONENT such as '12.attn', "
                f"with component one of {[c.value for c in Component]}"
            )
        return cls(int(layer), parse_component(comp))


def parse_component(value: str | Component) -> Component:
    try:
        return Component(value)
    except ValueError:
        raise InvalidInputError(
            f"unknown site component {value!r}: expected one of {[c.value for c in Component]}"
        ) from None


def parse_sites(spec: str | Iterable[str | Site]) -> tuple[Site, ...]:
    """Parse ``"12.attn,12.mlp"`` or ``"12.attn+mlp"`` or a list of sites; sorted, no duplicates."""
    items: list[str | Site]
    if isinstance(spec, str):
        items = []
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            layer, _, comps = part.replace(":", ".").partition(".")
            items.extend(f"{layer}.{c}" for c in comps.split("+")) if comps else items.append(part)
    else:
        items = list(spec)
    sites = {s if isinstance(s, Site) else Site.parse(s) for s in items}
    if not sites:
        raise InvalidInputError("no steering sites given")
    return tuple(sorted(sites))


def check_layers_in_range(sites: Sequence[Site], num_layers: int) -> None:
    for site in sites:
        if site.layer >= num_layers:
            raise InvalidInputError(
                f"site {site} is out of range: the model has {num_layers} layers "
                f"(valid layers 0..{num_layers - 1})"
            )


def default_sites(num_layers: int, components: str = "attn+mlp") -> tuple[Site, ...]:
    """The middle layer, as the paper's code steers one middle layer."""
    return parse_sites(f"{num_layers // 2}.{components}")
