"""Teacher-forced NLL of a target under classifier-guided decoding's distribution.

At each target position ``t`` the generator's logits after ``prompt + target[:t]`` go
through a :class:`~fints.guidance.processor.GuidanceProcessor`, fed exactly as
``generate`` feeds it (the whole sequence so far, one token longer per call), and the
target token's log-probability is read from the softmax of what it returns: for a row
with weight alpha on class c of a classifier and plausibility rho,

    log p_guided(v) = log_softmax(log p_base(v) + alpha * log p_cls(c | target[:t], v))

over the tokens rho keeps (a token below the floor has probability 0: NLL inf). So the
benchmark measures what decoding uses, not a re-implementation of it. Rows without
weight get the plain generator's NLL (the processor leaves them as they came).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fints.errors import InvalidInputError
from fints.guidance.classifier import GuidanceClassifier
from fints.guidance.processor import GuidanceProcessor, GuidanceSpec
from fints.models import LoadedModel


@dataclass(frozen=True)
class GuidedRow:
    """One row of a spec: the index of its classifier (None: unguided), the class it is
    guided towards, the weight alpha and the plausibility rho (0: off)."""

    classifier: int | None = None
    label: str = ""
    alpha: float = 0.0
    plausible: float = 0.0


def build_spec(
    classifiers: Sequence[GuidanceClassifier], rows: Sequence[GuidedRow]
) -> GuidanceSpec:
    """A full-vocabulary :class:`GuidanceSpec` with one row per :class:`GuidedRow`."""
    if not rows:
        raise InvalidInputError("a spec needs at least one row")
    weights = [torch.zeros(len(rows), len(c.classes)) for c in classifiers]
    for r, row in enumerate(rows):
        if row.classifier is None or row.alpha == 0:
            continue
        if not 0 <= row.classifier < len(classifiers):
            raise InvalidInputError(f"row {r}: no classifier {row.classifier}")
        classes = classifiers[row.classifier].classes
        if row.label not in classes:
            raise InvalidInputError(f"row {r}: class {row.label!r} is not one of {classes}")
        weights[row.classifier][r, classes.index(row.label)] = row.alpha
    return GuidanceSpec(
        tuple(classifiers),
        tuple(weights),
        torch.zeros(len(rows), dtype=torch.long),
        torch.tensor([row.plausible for row in rows], dtype=torch.float64),
    )


@dataclass(frozen=True)
class GuidedSteps:
    """Per row and target position: the target token's guided log-probability (-inf where
    a row's plausibility floor drops it) and the token greedy guided decoding picks there."""

    logprobs: torch.Tensor  # [rows, len(target)] float64
    greedy: torch.Tensor  # [rows, len(target)] long

    @property
    def nll(self) -> torch.Tensor:
        """``[rows]`` float64: each row's mean per-token NLL (nats/token) of the target."""
        return -self.logprobs.mean(-1)


@torch.no_grad()
def guided_steps(
    model: LoadedModel, prompt: Sequence[int], target: Sequence[int], spec: GuidanceSpec
) -> GuidedSteps:
    """Teacher-force ``target`` after ``prompt`` through a fresh processor of ``spec``."""
    prompt, target = list(prompt), list(target)
    if not prompt or not target:
        raise InvalidInputError("the prompt and the target must each hold at least one token")
    device = model.device
    ids = torch.tensor([prompt + target[:-1]], dtype=torch.long, device=device)
    logits = model.model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1 :]
    rows = len(spec.top_k)
    processor = GuidanceProcessor(spec)
    full = torch.tensor(prompt + target, dtype=torch.long, device=device)
    logprobs = torch.empty(rows, len(target), dtype=torch.float64)
    greedy = torch.empty(rows, len(target), dtype=torch.long)
    for t, token in enumerate(target):
        seen = full[: len(prompt) + t].expand(rows, -1)
        guided = processor(seen, logits[t].expand(rows, -1))  # type: ignore[arg-type]
        logprobs[:, t] = guided.double().log_softmax(-1)[:, token].cpu()
        greedy[:, t] = guided.argmax(-1).cpu()
    return GuidedSteps(logprobs, greedy)


def guided_nll(
    model: LoadedModel, prompt: Sequence[int], target: Sequence[int], spec: GuidanceSpec
) -> torch.Tensor:
    """``[rows]`` float64: each row's mean per-token NLL (nats/token) of ``target``."""
    return guided_steps(model, prompt, target, spec).nll
