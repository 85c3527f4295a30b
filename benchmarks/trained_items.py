"""Per-item trained vectors with retrieval, for ``trained_probe.py --item-steps N``.

The paper's vectors are instance-tailored: each history item has its own, and a query
retrieves the relevant ones. Here each of an author's history items gets its own short
refinement of the author's vector (``--item-steps`` Adam updates on that item alone,
lr ``--item-lr``, an L2 pull ``--item-l2`` towards the author's vector: the trained
method's ``item`` stage). Per test query, the author's items are ranked by the MiniLM
keys of their inputs and the top ``--item-top-k`` vectors aggregated by the product's
retrieval (:func:`fints.retrieval.retrieve_and_aggregate`): attentive (tau 0.1) and
mean. Compared with the author's own user-level vector, the question is whether
retrieval picks anything the user vector does not already carry.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fints.dictionary import DictionaryMeta, UserDictionary
from fints.encoders import SentenceTransformerEncoder
from fints.models import LoadedModel
from fints.retrieval import retrieve_and_aggregate
from fints.sites import Site
from fints.vector_training import TrainingConfig, train_vectors

if TYPE_CHECKING:
    from trained_probe import Author, Row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--item-steps", type=int, default=0, help="per-item refinement steps (0: no per-item rows)"
    )
    parser.add_argument("--item-lr", type=float, default=0.05)
    parser.add_argument("--item-l2", type=float, default=1e-2)
    parser.add_argument("--item-top-k", type=int, default=5)


def item_vectors(
    model: LoadedModel,
    sites: tuple[Site, ...],
    author: Author,
    own: torch.Tensor,
    config: TrainingConfig,
    path: Path,
) -> torch.Tensor:
    """``[history items, sites, hidden]``: each item's refinement of ``own`` (cached)."""
    examples = author.train + author.valid  # the whole history, oldest first
    return cached_tensor(
        path,
        lambda: torch.stack(
            [
                train_vectors(model, sites, [example], init=own, config=config).values
                for example in examples
            ]
        ),
    )


def cached_tensor(path: Path, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The tensor saved at ``path``, or ``make()``'s, saved there (atomically) first."""
    if path.is_file():
        cached: torch.Tensor = torch.load(path)
        return cached
    tensor = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensor, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").rename(path)
    return tensor


def per_item_rows(
    model: LoadedModel,
    sites: tuple[Site, ...],
    authors: list[Author],
    own: dict[str, torch.Tensor],
    bare: dict[str, list[list[int]]],
    args: argparse.Namespace,
    cache_tag: str,
) -> dict[str, dict[str, Row]]:
    """Rows "own per-item (top-k attentive)" and "(top-k mean)" for every author."""
    config = TrainingConfig(
        steps=args.item_steps, lr=args.item_lr, l2=args.item_l2, patience=None, valid_fraction=0
    )
    encoder = SentenceTransformerEncoder()
    rows: dict[str, dict[str, Row]] = {}
    for n, a in enumerate(authors):
        tag = hashlib.sha256(f"{cache_tag}{config.to_dict()}{a.name}".encode()).hexdigest()[:16]
        vectors = item_vectors(model, sites, a, own[a.name], config, args.cache / f"item-{tag}.pt")
        meta = DictionaryMeta(
            model_fingerprint=model.fingerprint,
            model_name=model.name,
            sites=sites,
            hidden_size=model.hidden_size,
            key_encoder=encoder.name,
            key_dim=encoder.dim,
            prompt_template=a.template,
            dtype="float32",
            method="trained",
        )
        dictionary = UserDictionary(
            a.name,
            meta,
            [i.item_id for i in a.history],
            encoder.encode([i.input for i in a.history]),
            vectors,
        )
        queries = encoder.encode(a.queries)
        for aggregation in ("attentive", "mean"):
            found = retrieve_and_aggregate(
                queries,
                [dictionary] * len(a.queries),
                top_k=args.item_top_k,
                aggregation=aggregation,
            )
            label = f"own per-item (top-{args.item_top_k} {aggregation})"
            rows.setdefault(label, {})[a.name] = (bare[a.name], list(found.vectors))
        print(f"  per-item [{n + 1}/{len(authors)}] {a.name}", flush=True)
    return rows
