"""Trained vectors: optimized to make the user's own outputs likely, v = v_shared + delta.

``v_shared`` (the task direction) is trained on a sample of the whole tenant's history
(the job's pool; early-stopped on a held-out share of it) and cached per tenant in the
context's ``shared`` mapping; the user's delta starts from it and is trained on the
user's history for a few steps (optionally with an L2 penalty towards it and early
stopping on the user's latest items). Each entry holds the user's vector, or, with
``item_steps > 0``, the item's own short refinement of it (instance-tailored, so
retrieval picks the relevant ones; measured: no gain over the user vector, so off by
default). A new item updates the user's vector from where it was
(``incremental_steps``) instead of training from scratch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fints.dictionary import UserDictionary
from fints.errors import InvalidInputError
from fints.extraction.base import ExtractionJob, MethodConfig, MethodContext, Sides, register
from fints.history import HistoryItem
from fints.prompts import build_prompt_ids
from fints.sites import Site, default_sites
from fints.steps import Steps
from fints.target_nll import Example
from fints.vector_training import TrainingConfig, holdout_latest, training_steps

# Each stage's optimizer settings: TrainingConfig field -> the TrainedConfig field it is
# read from (a string), or its fixed value
_STAGES: dict[str, dict[str, Any]] = {
    "shared": {
        "steps": "shared_steps", "lr": "shared_lr", "l2": 0.0, "patience": "shared_patience",
        "valid_fraction": "shared_valid_fraction",
    },
    "user": {
        "steps": "steps", "lr": "lr", "l2": "l2", "patience": "patience",
        "valid_fraction": "valid_fraction",
    },
    "incremental": {
        "steps": "incremental_steps", "lr": "lr", "l2": "l2", "patience": None,
        "valid_fraction": 0.0,
    },
    "item": {
        "steps": "item_steps", "lr": "item_lr", "l2": "item_l2", "patience": None,
        "valid_fraction": 0.0,
    },
}  # fmt: skip


@dataclass(frozen=True)
class TrainedConfig(MethodConfig):
    name = "trained"

    # Defaults chosen on 12 dev headline authors and measured on 33 others and on the
    # persona task (BENCHMARKS.md, "Trained vectors: shared + per-user delta"): a short
    # delta (4 steps) beats longer training, L2 and early stopping.
    shared_steps: int = 60  # Adam steps for the tenant's shared vector (0: no shared part)
    shared_lr: float = 0.1
    # the shared vector keeps its best step on a held-out share of the pool and stops
    # after this many steps without a better one (None: every step, the last kept), as
    # the measured probe trained it: on a small tenant 60 steps overfit its few items
    shared_patience: int | None = 5
    shared_valid_fraction: float = 0.125
    steps: int = 4  # Adam steps for the user's delta
    lr: float = 0.05
    l2: float = 0.0  # penalty on ||delta||^2
    batch_size: int = 16
    max_target_tokens: int = 48
    patience: int | None = None  # early stopping on the user's latest items (None: off)
    valid_fraction: float = 0.25
    incremental_steps: int = 3  # a new item: steps from the user's current vector...
    replay: int = 3  # ... on the new items and this many of the latest old ones
    item_steps: int = 0  # per-item refinement steps (0: every entry is the user vector)
    item_lr: float = 0.05
    item_l2: float = 1e-2
    pool: int = 256  # tenant items the shared vector is trained on

    def __post_init__(self) -> None:
        at_least = {
            "steps": 1, "incremental_steps": 1, "shared_steps": 0, "item_steps": 0,
            "pool": 0, "replay": 0,
        }  # fmt: skip
        bad = [name for name, low in at_least.items() if getattr(self, name) < low]
        if bad:
            raise InvalidInputError(
                f"trained method settings {bad} are too small: "
                + ", ".join(f"{n} >= {at_least[n]}" for n in bad),
                param=bad[0],
            )
        for stage, names in _STAGES.items():  # the optimizer settings of every stage
            try:
                self.training(stage)
            except InvalidInputError as exc:
                name = str(names.get(exc.param or "", exc.param or ""))
                raise InvalidInputError(
                    f"trained method, {stage} stage: bad {name} ({exc})", param=name
                ) from None

    def default_sites(self, num_layers: int) -> tuple[Site, ...]:
        """The residual stream after the middle layer (15.block on SmolLM2's 30 layers),
        where the defaults above were chosen and measured."""
        return default_sites(num_layers, "block")

    @property
    def pool_size(self) -> int:
        return self.pool

    def default_steering(self) -> dict[str, Any]:
        """The vector as trained: absolute strength 1 (the library's and the server's
        default too)."""
        return {"relative": False, "strengths": {"attn": 1.0, "mlp": 1.0, "block": 1.0}}

    @property
    def per_site(self) -> bool:
        return False  # trained jointly at their sites

    @property
    def pool_includes_user(self) -> bool:
        return True

    @property
    def rebuilds_all(self) -> bool:
        return True

    def training(self, stage: str) -> TrainingConfig:
        """The optimizer settings of one stage: shared, user, incremental or item."""
        settings = {
            field: getattr(self, source) if isinstance(source, str) else source
            for field, source in _STAGES[stage].items()
        }
        return TrainingConfig(
            # shared and item stages run only when their steps are > 0
            **settings | {"steps": max(1, settings["steps"])},
            batch_size=self.batch_size,
            max_target_tokens=self.max_target_tokens,
        )


def _examples(context: MethodContext, items: list[HistoryItem]) -> list[Example]:
    tok = context.model.tokenizer
    return [
        (
            build_prompt_ids(tok, context.template, i.input, []),
            context.target_ids(i.output, end=True),
        )
        for i in items
    ]


def shared_vector(
    context: MethodContext, config: TrainedConfig, pool: list[HistoryItem]
) -> Steps[torch.Tensor]:
    """The tenant's task direction, trained once on ``pool`` and kept in ``context.shared``
    until the pool has doubled (or the caller clears it, e.g. when a user is deleted)."""
    shape = (len(context.sites), context.model.hidden_size)
    if not config.shared_steps or not pool:
        return torch.zeros(shape)
    made_with = [
        context.model.fingerprint,
        context.template.name,
        [str(s) for s in context.sites],
        config.training("shared").to_dict(),
        config.pool,
    ]
    key = hashlib.sha256(json.dumps(made_with).encode()).hexdigest()[:16]
    cached = context.shared.get(key)
    if cached is not None and len(pool) <= 2 * cached[1]:
        return cached[0]
    training = config.training("shared")
    # the pool is a seeded random sample, so its "latest" items are a random held-out share
    train, valid = _split(_examples(context, pool), training)
    trained = yield from _train(context, train, training, valid=valid)
    context.shared[key] = (trained, len(pool))
    return trained


def _train(
    context: MethodContext,
    examples: Sequence[Example],
    config: TrainingConfig,
    init: torch.Tensor | None = None,
    valid: Sequence[Example] | None = None,
) -> Steps[torch.Tensor]:
    """Vectors at the context's sites, trained in pieces of ``context.piece_items``."""
    trained = yield from training_steps(
        context.model, context.sites, examples, init=init, config=config, valid=valid,
        piece_items=context.piece_items,
    )  # fmt: skip
    return trained.values


def _user_vector(
    context: MethodContext,
    config: TrainedConfig,
    job: ExtractionJob,
    new: list[HistoryItem],
) -> Steps[torch.Tensor]:
    """The user's vector: trained from the shared one on the whole history (early-stopped
    on the latest items), or, with a current dictionary, updated from its mean vector on
    the new items and the latest ``replay`` old ones: a few steps, not a retraining."""
    if job.previous is not None and new:
        known = set(job.previous.item_ids)
        old = (
            [i for i in job.history if i.item_id in known][-config.replay :]
            if config.replay
            else []
        )
        return (
            yield from _train(
                context,
                _examples(context, new + old),
                config.training("incremental"),
                init=job.previous.vectors.mean(dim=0).to(torch.float32),
            )
        )
    train, valid = _split(_examples(context, list(job.history)), config.training("user"))
    shared = yield from shared_vector(context, config, list(job.pool))
    return (yield from _train(context, train, config.training("user"), init=shared, valid=valid))


def _split(
    examples: list[Example], training: TrainingConfig
) -> tuple[list[Example], list[Example]]:
    """(train, valid): the latest ``valid_fraction`` held out when training stops early;
    without early stopping every item trains and the last update is kept."""
    if training.patience is None:
        return examples, []
    return holdout_latest(examples, training.valid_fraction)


def trained_vectors(
    context: MethodContext, config: TrainedConfig, job: ExtractionJob
) -> Steps[Sides]:
    """Entries for every item of ``job.items`` (the whole history: a new item moves the
    user's vector, so every entry is rewritten), in steps of ``context.piece_items``."""
    items = list(job.items)
    known = set(job.previous.item_ids) if job.previous is not None else set()
    new = [i for i in items if i.item_id not in known]
    user = yield from _user_vector(context, config, job, new)
    vectors = user.expand(len(items), -1, -1).clone()
    previous = job.previous
    if config.item_steps:  # each item's own refinement; old ones keep theirs, moved along
        moved = user - previous.vectors.mean(dim=0) if previous is not None else None
        for n, item in enumerate(items):
            if previous is not None and moved is not None and item.item_id in known:
                vectors[n] = previous.vectors[previous.item_ids.index(item.item_id)] + moved
                continue
            vectors[n] = yield from _train(
                context, _examples(context, [item]), config.training("item"), init=user
            )
    context.advance(len(items))
    return Sides(
        kept=list(range(len(items))),
        positive=vectors,  # the entries are the whole vectors: shared + delta
        negative=torch.zeros_like(vectors),
        norms=(yield from _site_norms(context, items, job.previous)),
        skipped=[],
    )


def _site_norms(
    context: MethodContext, items: list[HistoryItem], previous: UserDictionary | None
) -> Steps[torch.Tensor]:
    """``[items, sites]`` typical activation norms over each output (for relative strengths):
    recorded for new items, the dictionary's recorded norms for the others."""
    norms = torch.zeros(len(items), len(context.sites))
    known = set(previous.item_ids) if previous is not None and previous.meta.site_norms else set()
    if known:
        norms[:] = previous.site_norms  # type: ignore[union-attr]
    todo = [n for n, i in enumerate(items) if i.item_id not in known]
    size = context.piece_items or context.batch_size
    for start in range(0, len(todo), size):
        chunk = todo[start : start + size]
        prompts, targets = zip(*_examples(context, [items[n] for n in chunk]), strict=True)
        norms[chunk] = context.means(list(prompts), list(targets))[1]
        yield
    return norms


register(TrainedConfig, trained_vectors)
