"""Steering vectors trained to minimize the NLL of a user's own outputs.

One vector per site, the same for every row and token, added at every position as in
generation. The design: ``v = v_shared + delta_user``. ``v_shared`` is trained on all
users of a tenant; ``delta_user`` starts from ``v_shared`` and is trained on the user's
own history with an L2 penalty ``l2 * ||v - init||^2`` and early stopping on the user's
latest history items (:func:`holdout_latest`).

Speed: the layers below the lowest steered layer do not depend on the vector, so on
llama-like models they run once per example without gradients
(:func:`fints.target_nll.capture_below`); each step reruns only the layers from there
up, with logits only at the target positions. Other architectures use the full
forward pass with hooks (same loss, slower).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from fints.errors import InvalidInputError
from fints.models import LoadedModel
from fints.sites import Site, check_layers_in_range
from fints.steps import Steps, run_to_end
from fints.target_nll import (
    Example,
    PackedBatch,
    UpperState,
    capture_below,
    forward_nll,
    is_llama_like,
    pack,
    upper_nll,
)

ForwardPath = Literal["auto", "cached", "full"]


@dataclass(frozen=True)
class TrainingConfig:
    """How vectors are trained.

    ``steps`` Adam updates at learning rate ``lr``, each on one batch of at most
    ``batch_size`` examples (fixed batches, visited in a seeded shuffled order per
    epoch); loss = mean per-example per-token NLL + ``l2 * ||v - init||^2``. Targets are
    cut to ``max_target_tokens``. With validation examples, the step with the lowest
    validation NLL is kept (step 0 = the init) and training stops after ``patience``
    evaluations without improvement (``None``: never early). ``valid_fraction`` is the
    share of a history :func:`holdout_latest` keeps for validation.
    """

    steps: int = 10
    lr: float = 0.05
    l2: float = 1e-3
    batch_size: int = 16
    max_target_tokens: int = 32
    patience: int | None = 3
    valid_fraction: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "steps": self.steps >= 1,
            "lr": self.lr > 0 and math.isfinite(self.lr),
            "l2": self.l2 >= 0 and math.isfinite(self.l2),
            "batch_size": self.batch_size >= 1,
            "max_target_tokens": self.max_target_tokens >= 1,
            "patience": self.patience is None or self.patience >= 1,
            "valid_fraction": 0 <= self.valid_fraction < 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise InvalidInputError(
                f"invalid training config field(s) {bad}: {self.to_dict()}", param=bad[0]
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(f"unknown training config field(s) {unknown}")
        return cls(**data)


@dataclass(frozen=True)
class TrainedVectors:
    """The kept vectors and how training went.

    ``train_losses[k]`` is the data NLL of the batch used by update ``k + 1`` (before it);
    ``valid_losses[k]`` the validation NLL after ``k`` updates (empty without validation).
    ``best_step`` is the number of updates behind ``values``.
    """

    sites: tuple[Site, ...]
    values: torch.Tensor  # [len(sites), hidden], float32, CPU
    train_losses: tuple[float, ...]
    valid_losses: tuple[float, ...]
    best_step: int
    steps_run: int
    config: TrainingConfig

    def rows(self, n: int = 1) -> dict[Site, torch.Tensor]:
        """``{site: [n, hidden]}`` for :func:`fints.injection.steer` or ``target_nll``."""
        return {s: self.values[i].unsqueeze(0).expand(n, -1) for i, s in enumerate(self.sites)}


def holdout_latest(
    examples: Sequence[Example], fraction: float
) -> tuple[list[Example], list[Example]]:
    """Split oldest-first ``examples`` into (train, valid): the latest ``fraction`` (at
    least one when ``fraction > 0`` and two or more examples) is validation."""
    n_valid = min(len(examples) - 1, math.ceil(len(examples) * fraction)) if fraction else 0
    n_valid = max(n_valid, 0)
    cut = len(examples) - n_valid
    return list(examples[:cut]), list(examples[cut:])


class _Objective:
    """Per-example NLL of fixed batches as a function of the site vectors.

    Each batch is packed in pieces of at most ``piece_items`` examples (None: whole), so
    that the work between two ``yield``\\ s stays bounded; the gradient of a batch is
    accumulated over its pieces.
    """

    def __init__(
        self,
        model: LoadedModel,
        sites: Sequence[Site],
        examples: Sequence[Example],
        config: TrainingConfig,
        cached: bool,
        order_seed: int | None,
        piece_items: int | None = None,
    ) -> None:
        self.model, self.sites, self.cached = model, tuple(sites), cached
        index = list(range(len(examples)))
        if order_seed is not None:
            random.Random(order_seed).shuffle(index)
        pad_id = model.tokenizer.pad_token_id or 0
        self.batches: list[list[PackedBatch]] = []
        for s in range(0, len(index), config.batch_size):
            batch = [examples[i] for i in index[s : s + config.batch_size]]
            size = piece_items or len(batch)
            self.batches.append(
                [
                    pack(batch[p : p + size], pad_id, max_target_tokens=config.max_target_tokens)
                    for p in range(0, len(batch), size)
                ]
            )
        self.states: list[list[UpperState | None]] = []
        self.examples = sum(piece.size for pieces in self.batches for piece in pieces)

    def capture(self) -> Steps[None]:
        """Run the layers below the lowest site once per piece (cached path); a piece a step."""
        lowest = min(site.layer for site in self.sites)
        for pieces in self.batches:
            states: list[UpperState | None] = []
            for piece in pieces:
                states.append(capture_below(self.model, piece, lowest) if self.cached else None)
                yield
            self.states.append(states)

    def per_example(self, values: torch.Tensor, k: int, p: int) -> torch.Tensor:
        piece, state = self.batches[k][p], self.states[k][p]
        rows = {s: values[i].unsqueeze(0).expand(piece.size, -1) for i, s in enumerate(self.sites)}
        if state is not None:
            return upper_nll(self.model, piece, state, rows)
        return forward_nll(self.model, piece, rows)

    def backward(self, values: torch.Tensor, k: int) -> Steps[float]:
        """Add the gradient of batch ``k``'s mean NLL to ``values.grad``, a piece a step;
        return that mean."""
        pieces = self.batches[k]
        size = sum(piece.size for piece in pieces)
        total = 0.0
        for p in range(len(pieces)):
            nll = self.per_example(values, k, p)
            (nll.sum() / size).backward()
            total += float(nll.detach().sum())
            yield
        return total / size

    def mean_nll(self, values: torch.Tensor) -> Steps[float]:
        """The mean NLL over every example, a piece a step."""
        total = 0.0
        for k, pieces in enumerate(self.batches):
            for p in range(len(pieces)):
                with torch.no_grad():  # closed before the yield: grad mode never leaks
                    total += float(self.per_example(values, k, p).sum())
                yield
        return total / self.examples


def _use_cache(model: LoadedModel, path: ForwardPath) -> bool:
    if path == "cached" and not is_llama_like(model):
        raise InvalidInputError(
            f"the cached path needs a llama-like model, not {model.model.config.model_type!r}"
        )
    return path == "cached" or (path == "auto" and is_llama_like(model))


class _FrozenEval:
    """Freeze the model's parameters and put it in eval mode; restore both on exit."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.flags = [p.requires_grad for p in self.model.parameters()]
        self.training = self.model.training
        self.model.requires_grad_(False)
        self.model.eval()

    def __exit__(self, *_exc: object) -> None:
        for p, flag in zip(self.model.parameters(), self.flags, strict=True):
            p.requires_grad_(flag)
        self.model.train(self.training)


def train_vectors(
    model: LoadedModel,
    sites: Sequence[Site],
    examples: Sequence[Example],
    *,
    init: torch.Tensor | None = None,
    config: TrainingConfig | None = None,
    valid: Sequence[Example] | None = None,
    progress: bool = False,
    path: ForwardPath = "auto",
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> TrainedVectors:
    """Train one vector per site (``[len(sites), hidden]``) to minimize the mean per-token
    NLL of the targets of ``examples`` (``(prompt_ids, target_ids)`` pairs).

    ``init`` (e.g. a shared vector; zero if ``None``) is the start and the anchor of the
    L2 penalty. ``valid`` examples are only used to pick the step kept and to stop early.
    ``path``: ``cached`` reruns only the layers from the lowest site up (llama-like
    models), ``full`` runs the whole network each step, ``auto`` picks ``cached`` when
    it can. ``on_step(step, values)`` sees the vectors after every update (a copy on the
    CPU; for sweeps that evaluate several stopping points of one run).
    """
    return run_to_end(
        training_steps(
            model,
            sites,
            examples,
            init=init,
            config=config,
            valid=valid,
            progress=progress,
            path=path,
            on_step=on_step,
        )
    )


def training_steps(
    model: LoadedModel,
    sites: Sequence[Site],
    examples: Sequence[Example],
    *,
    init: torch.Tensor | None = None,
    config: TrainingConfig | None = None,
    valid: Sequence[Example] | None = None,
    progress: bool = False,
    path: ForwardPath = "auto",
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    piece_items: int | None = None,
) -> Steps[TrainedVectors]:
    """:func:`train_vectors` in steps (:mod:`fints.steps`): it yields after every forward
    and backward pass over at most ``piece_items`` examples (None: a whole batch), so a
    caller can run other work on the model between them. Same vectors either way (up to
    the rounding of a gradient summed over pieces)."""
    config = config or TrainingConfig()
    sites = tuple(sites)
    if not sites or len(set(sites)) != len(sites):
        raise InvalidInputError(f"sites must be non-empty and distinct, got {sites}")
    if not examples:
        raise InvalidInputError("no training examples")
    if piece_items is not None and piece_items < 1:
        raise InvalidInputError(f"piece_items must be >= 1, got {piece_items}")
    check_layers_in_range(sites, model.num_layers)
    shape = (len(sites), model.hidden_size)
    anchor = torch.zeros(shape) if init is None else init.detach().float().cpu().clone()
    if tuple(anchor.shape) != shape or not torch.isfinite(anchor).all():
        raise InvalidInputError(f"init must be finite and {list(shape)}, got {list(anchor.shape)}")
    cached = _use_cache(model, path)
    train = _Objective(model, sites, examples, config, cached, config.seed, piece_items)
    check = _Objective(model, sites, valid, config, cached, None, piece_items) if valid else None
    with _FrozenEval(model.model):
        yield from train.capture()
        if check is not None:
            yield from check.capture()
        return (yield from _train(train, check, anchor, config, progress, on_step))


def _train(
    train: _Objective,
    check: _Objective | None,
    anchor: torch.Tensor,
    config: TrainingConfig,
    progress: bool,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> Steps[TrainedVectors]:
    device_anchor = anchor.to(train.model.device)
    values = device_anchor.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([values], lr=config.lr)
    rng = random.Random(config.seed + 1)
    order: list[int] = []
    train_losses: list[float] = []
    valid_losses = [(yield from check.mean_nll(values))] if check else []
    best, best_step, stale, steps_run = values.detach().clone(), 0, 0, 0
    bar = tqdm(total=config.steps, desc="training vectors", unit="step", disable=not progress)
    for step in range(1, config.steps + 1):
        if not order:
            order = list(range(len(train.batches)))
            rng.shuffle(order)
        optimizer.zero_grad(set_to_none=True)
        data = yield from train.backward(values, order.pop())
        if config.l2:
            (config.l2 * (values - device_anchor).pow(2).sum()).backward()
        optimizer.step()
        train_losses.append(data)
        steps_run = step
        if on_step is not None:
            on_step(step, values.detach().float().cpu().clone())
        if check is None:
            best, best_step = values.detach().clone(), step
        else:
            valid_losses.append((yield from check.mean_nll(values)))
            if valid_losses[-1] < min(valid_losses[:-1]):
                best, best_step, stale = values.detach().clone(), step, 0
            else:
                stale += 1
        bar.update(1)
        bar.set_postfix(
            train=f"{train_losses[-1]:.4f}",
            **({"valid": f"{valid_losses[-1]:.4f}"} if valid_losses else {}),
        )
        if config.patience is not None and stale >= config.patience:
            break
    bar.close()
    return TrainedVectors(
        sites=train.sites,
        values=best.float().cpu(),
        train_losses=tuple(train_losses),
        valid_losses=tuple(valid_losses),
        best_step=best_step,
        steps_run=steps_run,
        config=config,
    )


def _interleaved(fns: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """Median wall time of each function, run alternately so that load drift hits all."""
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, samples, strict=True):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [sorted(s)[len(s) // 2] for s in samples]


def training_cost_ratio(
    model: LoadedModel,
    sites: Sequence[Site],
    history: Sequence[Example],
    *,
    config: TrainingConfig | None = None,
    init: torch.Tensor | None = None,
    repeats: int = 3,
    forward_batch_size: int = 8,
) -> dict[str, float]:
    """Wall time per history item of training a user vector on ``history`` (the latest
    ``valid_fraction`` held out for early stopping, as a user's delta is trained) against
    one plain forward pass (full logits, batches of ``forward_batch_size``, right padded)
    over the same item's prompt + target. Medians of ``repeats`` runs after a warm-up."""
    config = config or TrainingConfig()
    train, valid = holdout_latest(history, config.valid_fraction)
    pad_id = model.tokenizer.pad_token_id or 0
    cut = config.max_target_tokens

    @torch.inference_mode()
    def plain_forward() -> None:
        for s in range(0, len(history), forward_batch_size):
            chunk = history[s : s + forward_batch_size]
            batch = pack(chunk, pad_id, max_target_tokens=cut)
            model.model(
                input_ids=batch.input_ids.to(model.device),
                attention_mask=batch.attention_mask.to(model.device),
            )

    steps_run: list[int] = []

    def training() -> None:
        result = train_vectors(model, sites, train, init=init, config=config, valid=valid)
        steps_run.append(result.steps_run)

    plain_forward()  # warm-up
    training()
    t_forward, t_train = _interleaved([plain_forward, training], repeats)
    n = len(history)
    return {
        "items": float(n),
        "steps_run": float(steps_run[-1]),
        "train_s_per_item": t_train / n,
        "forward_s_per_item": t_forward / n,
        "ratio": t_train / t_forward,
    }
