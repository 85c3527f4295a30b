"""The steering plan: from each row's dictionary, query key and settings to the vectors
the hooks add. The one path every caller takes (the engine, hence the server, and
the benchmark): retrieve and aggregate (:func:`plan_steering`), optionally transform
(controls such as a random direction or centering are transformations of the plan,
not copies of it), then scale (:meth:`SteeringPlan.vectors`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from fints.dictionary import UserDictionary
from fints.errors import InvalidInputError
from fints.retrieval import retrieve_and_aggregate
from fints.sites import Site
from fints.steering import SteeringConfig, effective_vectors


@dataclass(frozen=True)
class SteeringPlan:
    """Per-row aggregated vectors, before scaling.

    ``aggregated[b, s]`` is row b's vector at ``sites[s]`` (zeros where row b's
    dictionary has no such site, or where it has no dictionary).
    """

    sites: tuple[Site, ...]
    aggregated: torch.Tensor  # [batch, sites, hidden]
    site_norms: torch.Tensor  # [batch, sites] typical activation norms (0 where no vector)
    configs: tuple[SteeringConfig, ...]
    steered: tuple[bool, ...]  # rows that have a dictionary (and steering enabled)
    row_sites: tuple[tuple[Site, ...], ...]  # per row: the sites its dictionary has
    retrieved: tuple[tuple[str, ...], ...]  # per row: retrieved item ids, best first
    weights: tuple[tuple[float, ...], ...]  # per row: their aggregation weights

    def vectors(self) -> dict[Site, torch.Tensor]:
        """``{site: [batch, hidden]}``: each row's vectors scaled by its own settings.

        Rows without steering, and sites a row's dictionary lacks, stay zero.
        """
        if not self.sites:
            return {}
        return effective_vectors(self.sites, self.aggregated, self.configs, self.site_norms)

    def with_aggregated(self, aggregated: torch.Tensor) -> SteeringPlan:
        """The same plan with other aggregated vectors (a control's transformation)."""
        if aggregated.shape != self.aggregated.shape:
            raise InvalidInputError(
                f"aggregated vectors of shape {tuple(aggregated.shape)} for a plan of "
                f"{tuple(self.aggregated.shape)}"
            )
        return replace(self, aggregated=aggregated.to(self.aggregated.dtype))

    def shifted(self, delta: torch.Tensor) -> SteeringPlan:
        """Add ``delta`` (``[batch, sites, hidden]``) to every steered row, e.g. minus a
        shared direction (centering)."""
        mask = torch.tensor(self.steered, dtype=self.aggregated.dtype).view(-1, 1, 1)
        return self.with_aggregated(self.aggregated + mask * delta.to(self.aggregated.dtype))

    def randomized(self, seeds: Sequence[str]) -> SteeringPlan:
        """Each row's vectors replaced by a random direction of the same norm per site,
        drawn from the row's own seed over the row's own sites (so a row's control does
        not depend on the rest of its batch)."""
        if len(seeds) != len(self.steered):
            raise InvalidInputError(f"{len(seeds)} seeds for a plan of {len(self.steered)} rows")
        out = torch.zeros_like(self.aggregated)
        for row, seed in enumerate(seeds):
            columns = [self.sites.index(s) for s in self.row_sites[row]]
            if not columns:
                continue
            digest = hashlib.sha256(seed.encode()).hexdigest()
            gen = torch.Generator().manual_seed(int(digest[:12], 16))
            noise = torch.randn((len(columns), self.aggregated.shape[2]), generator=gen)
            noise = noise / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            out[row, columns] = noise * self.aggregated[row, columns].norm(dim=-1, keepdim=True)
        return self.with_aggregated(out)


def plan_steering(
    dictionaries: Sequence[UserDictionary | None],
    keys: Sequence[torch.Tensor | None],
    configs: Sequence[SteeringConfig],
) -> SteeringPlan:
    """Retrieve and aggregate each row's vectors from its own user's dictionary.

    Rows sharing retrieval settings and sites are retrieved together, vectorized; a row
    with no dictionary (or steering disabled) is planned unsteered.
    """
    if not len(dictionaries) == len(keys) == len(configs):
        raise InvalidInputError(
            f"{len(dictionaries)} dictionaries, {len(keys)} keys and {len(configs)} configs"
        )
    batch = len(dictionaries)
    use = [
        d if d is not None and len(d) and c.enabled else None
        for d, c in zip(dictionaries, configs, strict=True)
    ]
    sites = tuple(sorted({s for d in use if d is not None for s in d.meta.sites}))
    hidden = next((d.meta.hidden_size for d in use if d is not None), 0)
    aggregated = torch.zeros(batch, len(sites), hidden)
    norms = torch.zeros(batch, len(sites))  # zero where a row has no vector: it stays zero
    retrieved: list[tuple[str, ...]] = [() for _ in range(batch)]
    weights: list[tuple[float, ...]] = [() for _ in range(batch)]
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, d in enumerate(use):
        if d is not None:
            if keys[i] is None:
                raise InvalidInputError(f"row {i} has a dictionary but no query key")
            c = configs[i]
            groups.setdefault((c.top_k, c.aggregation, c.tau, d.meta.sites), []).append(i)
    for (top_k, aggregation, tau, group_sites), rows in groups.items():
        group = [use[i] for i in rows]
        found = retrieve_and_aggregate(
            torch.stack([keys[i] for i in rows]),  # type: ignore[misc]
            group,
            top_k=top_k,
            aggregation=aggregation,
            tau=tau,
        )
        columns = [sites.index(s) for s in group_sites]
        for n, (i, d) in enumerate(zip(rows, group, strict=True)):
            assert d is not None
            aggregated[i, columns] = found.vectors[n].to(torch.float32)
            norms[i, columns] = d.site_norms
            retrieved[i] = tuple(d.item_ids[j] for j in found.indices[n])
            weights[i] = tuple(found.weights[n])
    return SteeringPlan(
        sites=sites,
        aggregated=aggregated,
        site_norms=norms,
        configs=tuple(configs),
        steered=tuple(d is not None for d in use),
        row_sites=tuple(d.meta.sites if d is not None else () for d in use),
        retrieved=tuple(retrieved),
        weights=tuple(weights),
    )
