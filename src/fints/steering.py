"""Steering settings and the vectors they produce.

:class:`SteeringVector` is one vector per site; :class:`SteeringConfig` says
where and how strongly to steer and how to retrieve; :func:`effective_vectors`
turns aggregated per-row vectors into what :func:`fints.injection.steer` adds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from fints.errors import InvalidInputError
from fints.sites import Component, Site, parse_component

Aggregation = Literal["mean", "attentive"]


@dataclass(frozen=True)
class SteeringVector:
    """A vector per site: ``values[i]`` belongs to ``sites[i]``."""

    sites: tuple[Site, ...]
    values: torch.Tensor  # [len(sites), hidden]

    def __post_init__(self) -> None:
        if self.values.dim() != 2 or self.values.shape[0] != len(self.sites):
            raise InvalidInputError(
                f"steering vector values must be [{len(self.sites)}, hidden], "
                f"got {tuple(self.values.shape)}"
            )
        if not torch.isfinite(self.values).all():
            bad = [
                str(s)
                for s, v in zip(self.sites, self.values, strict=True)
                if not torch.isfinite(v).all()
            ]
            raise InvalidInputError(f"steering vector has NaN or inf values at sites {bad}")

    def __getitem__(self, site: Site) -> torch.Tensor:
        return self.values[self.sites.index(site)]


DEFAULT_STRENGTHS: dict[Component, float] = {
    Component.ATTN: 1.0,
    Component.MLP: 1.0,
    Component.BLOCK: 1.0,
}


@dataclass(frozen=True)
class SteeringConfig:
    """How a request is steered.

    ``strengths`` are per component: alpha for attn, beta for mlp, and one for
    block. With ``relative=True`` a strength is a fraction of the site's typical
    activation norm (the aggregated vector is rescaled to ``strength * norm``);
    otherwise it multiplies the aggregated vector as it is.
    """

    sites: tuple[Site, ...] | None = None  # None: every site in the user's dictionary
    strengths: Mapping[Component, float] | Mapping[str, float] = field(
        default_factory=lambda: dict(DEFAULT_STRENGTHS)
    )
    relative: bool = False
    top_k: int = 5
    aggregation: Aggregation = "attentive"
    tau: float = 0.1
    icl_k: int = 0  # the user's own top-k history items put into the prompt
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise InvalidInputError(f"top_k must be >= 1, got {self.top_k}")
        if self.aggregation not in ("mean", "attentive"):
            raise InvalidInputError(
                f"aggregation must be 'mean' or 'attentive', got {self.aggregation!r}"
            )
        if not self.tau > 0:
            raise InvalidInputError(f"tau must be > 0, got {self.tau}")
        if self.icl_k < 0:
            raise InvalidInputError(f"icl_k must be >= 0, got {self.icl_k}")
        strengths = {parse_component(k): float(v) for k, v in self.strengths.items()}
        for comp, value in strengths.items():
            if not torch.isfinite(torch.tensor(value)):
                raise InvalidInputError(f"strength for {comp} must be finite, got {value}")
        object.__setattr__(self, "strengths", {**DEFAULT_STRENGTHS, **strengths})

    def with_(self, **changes: object) -> SteeringConfig:
        return replace(self, **changes)  # type: ignore[arg-type]

    def strength(self, site: Site) -> float:
        return self.strengths[site.component]


def effective_vectors(
    sites: Sequence[Site],
    aggregated: torch.Tensor,
    configs: Sequence[SteeringConfig],
    site_norms: torch.Tensor | None,
) -> dict[Site, torch.Tensor]:
    """Scale aggregated vectors ``[batch, sites, hidden]`` per row into ``{site: [batch, hidden]}``.

    ``site_norms`` (``[batch, sites]``) is each row's typical activation norm per
    site, needed only for rows with ``relative=True``.

    A row whose config leaves a site out (or disables steering) gets zeros there.
    """
    batch = aggregated.shape[0]
    scale = torch.zeros(batch, len(sites))
    for row, config in enumerate(configs):
        if not config.enabled:
            continue
        for s, site in enumerate(sites):
            if config.sites is None or site in config.sites:
                scale[row, s] = config.strength(site)
    vectors = aggregated * scale.unsqueeze(-1)
    relative = torch.tensor([c.relative for c in configs])
    if relative.any():
        if site_norms is None:
            raise InvalidInputError("relative strengths need the dictionary's site norms")
        unit = aggregated / aggregated.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        rel = unit * (scale * site_norms).unsqueeze(-1)
        vectors = torch.where(relative.view(-1, 1, 1), rel, vectors)
    return {site: vectors[:, s] for s, site in enumerate(sites)}
