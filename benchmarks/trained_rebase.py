"""Deltas trained from a better task vector, for ``trained_probe.py --rebase``.

The control "shared + mean other deltas" can beat the shared vector itself (the shared
vector stopped early, and every author's delta carries on with the task); then "own
minus shared" mixes task learning with the author. Here each author's delta is trained
again, with the same settings, from a *rebased* start: the shared vector plus the mean
of the other evaluated authors' deltas. The rows "rebased" (that start) and "own
(rebased)" (the start plus the new delta) ask whether anything personal is left above
a task vector that no longer lags: the comparison "own (rebased) minus rebased".
"""

from __future__ import annotations

import argparse
import hashlib
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from trained_items import cached_tensor

from fints.models import LoadedModel
from fints.sites import Site
from fints.vector_training import TrainingConfig, train_vectors

if TYPE_CHECKING:
    from trained_probe import Author, Row

REBASED, OWN_REBASED = "rebased", "own (rebased)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rebase",
        action="store_true",
        help="also deltas trained from shared + the mean of the other authors' deltas",
    )


def mean_of_others(deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per author, the mean of every other author's delta."""
    return {n: torch.stack([d for m, d in deltas.items() if m != n]).mean(dim=0) for n in deltas}


def trained_from(
    model: LoadedModel,
    sites: tuple[Site, ...],
    author: Author,
    start: torch.Tensor,
    config: TrainingConfig,
) -> torch.Tensor:
    """``[sites, hidden]``: the author's vector trained from ``start`` (early-stopped on
    their latest items when ``config.patience`` is set, as the probe's deltas are)."""
    valid = author.valid if config.patience is not None else None
    return train_vectors(model, sites, author.train, init=start, config=config, valid=valid).values


def rebased_rows(
    model: LoadedModel,
    sites: tuple[Site, ...],
    authors: list[Author],
    shared: torch.Tensor,
    own: dict[str, torch.Tensor],
    config: TrainingConfig,
    bare: dict[str, list[list[int]]],
    cache: Path,
    cache_tag: str,
) -> dict[str, dict[str, Row]]:
    """Rows :data:`REBASED` and :data:`OWN_REBASED` for every author (``own``: each
    author's vector, shared + their delta)."""
    others = mean_of_others({a.name: own[a.name] - shared for a in authors})
    rows: dict[str, dict[str, Row]] = {}
    for n, a in enumerate(authors):
        start = shared + others[a.name]
        tag = hashlib.sha256(f"{cache_tag}{config.to_dict()}{a.name}".encode()).hexdigest()[:16]
        train = partial(trained_from, model, sites, a, start, config)
        vector = cached_tensor(cache / f"rebased-{tag}.pt", train)
        queries = len(bare[a.name])
        rows.setdefault(REBASED, {})[a.name] = (bare[a.name], [start] * queries)
        rows.setdefault(OWN_REBASED, {})[a.name] = (bare[a.name], [vector] * queries)
        print(
            f"  rebased [{n + 1}/{len(authors)}] {a.name}: new delta norm "
            f"{(vector - start).norm():.2f}",
            flush=True,
        )
    return rows
