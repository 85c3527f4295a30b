"""Steering settings and the vectors they produce.

:class:`SteeringVector` is one vector per site; :class:`SteeringConfig` says
where and how strongly to steer and how to retrieve; :func:`effective_vectors`
turns aggregated per-row vectors into what :func:`fints.injection.steer` adds.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Literal

import torch

from fints.errors import InvalidInputError
from fints.sites import Component, Site, parse_component, parse_sites

if TYPE_CHECKING:
    from fints.layers import DecoderLayout

Aggregation = Literal["mean", "attentive"]
AGGREGATIONS: tuple[Aggregation, ...] = ("mean", "attentive")
#: The largest strength accepted: beyond it a vector only overflows.
MAX_STRENGTH = 1e4


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

    @contextmanager
    def apply(self, layout: DecoderLayout, *, strength: float = 1.0) -> Iterator[None]:
        """Add ``strength`` times this vector at its sites, to every row and token, inside
        the ``with`` block; the hooks are removed on exit, also on error."""
        from fints.injection import steer

        rows = {site: (strength * self.values[i]).unsqueeze(0) for i, site in enumerate(self.sites)}
        with steer(layout, rows):
            yield


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
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise InvalidInputError(
                f"top_k must be an integer >= 1, got {self.top_k!r}", param="top_k"
            )
        if self.aggregation not in AGGREGATIONS:
            raise InvalidInputError(
                f"aggregation must be 'mean' or 'attentive', got {self.aggregation!r}",
                param="aggregation",
            )
        if not _is_number(self.tau) or not 0 < self.tau < math.inf:
            raise InvalidInputError(
                f"tau must be a finite number > 0, got {self.tau!r}", param="tau"
            )
        if isinstance(self.icl_k, bool) or not isinstance(self.icl_k, int) or self.icl_k < 0:
            raise InvalidInputError(
                f"icl_k must be an integer >= 0, got {self.icl_k!r}", param="icl_k"
            )
        for name in ("relative", "enabled"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(
                    f"{name} must be true or false, got {getattr(self, name)!r}", param=name
                )
        if not isinstance(self.strengths, Mapping):
            raise InvalidInputError(
                f"strengths must map components to numbers, got {self.strengths!r}",
                param="strengths",
            )
        strengths: dict[Component, float] = {}
        for key, value in self.strengths.items():
            try:
                comp = parse_component(key)
            except InvalidInputError as exc:
                raise InvalidInputError(str(exc), param="strengths") from None
            if not _is_number(value) or not abs(value) <= MAX_STRENGTH:
                raise InvalidInputError(
                    f"strength for {comp} must be a number within +-{MAX_STRENGTH:g}, "
                    f"got {value!r}",
                    param="strengths",
                )
            strengths[comp] = float(value)
        object.__setattr__(self, "strengths", {**DEFAULT_STRENGTHS, **strengths})
        if self.sites is not None:
            sites = parse_sites_param(self.sites)
            object.__setattr__(self, "sites", sites)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data; :meth:`from_dict` reads it back."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["sites"] = None if self.sites is None else [str(s) for s in self.sites]
        data["strengths"] = {str(c): v for c, v in self.strengths.items()}
        return data

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, base: SteeringConfig | None = None
    ) -> SteeringConfig:
        """A config from JSON data: the one parser behind CLI flags, server defaults and
        the request's ``fints`` field. Keys left out (or None) keep ``base``'s values;
        given strengths update ``base``'s per component. Errors name the field."""
        if not isinstance(data, Mapping):
            raise InvalidInputError(f"steering settings must be an object, got {data!r}")
        base = base or cls()
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(
                f"unknown steering setting(s) {unknown}: expected some of {sorted(known)}",
                param=unknown[0],
            )
        changes = {k: v for k, v in data.items() if v is not None}
        if "strengths" in changes:
            given = changes["strengths"]
            if not isinstance(given, Mapping):
                raise InvalidInputError(
                    f"strengths must map components to numbers, got {given!r}", param="strengths"
                )
            changes["strengths"] = {**base.strengths, **given}
        return replace(base, **changes)

    def with_(self, **changes: object) -> SteeringConfig:
        return replace(self, **changes)  # type: ignore[arg-type]

    def strength(self, site: Site) -> float:
        return self.strengths[site.component]


def parse_sites_param(value: object) -> tuple[Site, ...]:
    """Sites from a string (``"15.attn+mlp"``) or a list of strings; errors name ``sites``."""
    ok = isinstance(value, str) or (
        isinstance(value, list | tuple) and all(isinstance(v, str | Site) for v in value)
    )
    if not ok:
        raise InvalidInputError(
            f"sites must be a string such as '15.attn+mlp' or a list of such strings, "
            f"got {value!r}",
            param="sites",
        )
    try:
        return parse_sites(value)  # type: ignore[arg-type]
    except InvalidInputError as exc:
        raise InvalidInputError(str(exc), param="sites") from None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


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
        used = relative.view(-1, 1) & (scale != 0)
        if site_norms is None or not torch.isfinite(site_norms[used]).all():
            raise InvalidInputError(
                "relative strengths need the dictionary's site norms, and this dictionary "
                "has none: re-extract it, or steer with absolute strengths (relative=false)",
                param="relative",
            )
        unit = aggregated / aggregated.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        rel = unit * (scale * site_norms).unsqueeze(-1)
        vectors = torch.where(relative.view(-1, 1, 1), rel, vectors)
    return {site: vectors[:, s] for s, site in enumerate(sites)}
