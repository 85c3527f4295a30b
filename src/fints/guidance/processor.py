"""The ``transformers`` ``LogitsProcessor`` of classifier-guided decoding.

Each row ``r`` of a batch has a weight (alpha) per class of each classifier; at every
step the processor turns that row's scores into

    log p_base(v) + sum_d sum_c alpha[d, r, c] * log p_d(c | prefix, v)

for every vocabulary token (``full``) or for the base distribution's top ``k`` tokens
only, the rest dropped (``topk``, FUDGE). A row's ``plausible`` = rho > 0 drops, besides,
every token whose base probability is below rho times the step's largest (the adaptive
plausibility constraint of contrastive decoding, Li et al. 2023): guidance reorders the
plausible candidates only, and the base distribution's argmax is always among them.
Rows with no weight above zero are returned as they came, bit for bit. The classifiers
read only what the generator has written so far (after their lead token), one new token
per step, with one KV cache per backbone: classifiers sharing a backbone share its
forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor

from fints.errors import InvalidInputError
from fints.guidance.classifier import Backbone, GuidanceClassifier


@dataclass(frozen=True)
class GuidanceSpec:
    """Per batch: the classifiers, each one's per-row class weights ``[batch, classes]``,
    per row ``top_k`` (0: score the full vocabulary) and ``plausible`` (rho in [0, 1]; left
    out: 0 for every row, no constraint)."""

    classifiers: tuple[GuidanceClassifier, ...]
    weights: tuple[torch.Tensor, ...]
    top_k: torch.Tensor  # [batch], long
    plausible: torch.Tensor | None = None  # [batch], float

    def __post_init__(self) -> None:
        rho = self.plausible
        if rho is None:
            rho = torch.zeros(len(self.top_k), dtype=torch.float64)
        rho = torch.as_tensor(rho, dtype=torch.float64)
        if rho.shape != self.top_k.shape:
            raise InvalidInputError(
                f"plausible must be one number per row, [{len(self.top_k)}], got {tuple(rho.shape)}"
            )
        if not torch.isfinite(rho).all() or (rho < 0).any() or (rho > 1).any():
            raise InvalidInputError("plausible must be finite and in [0, 1]")
        object.__setattr__(self, "plausible", rho)
        if len(self.classifiers) != len(self.weights):
            raise InvalidInputError("one weight matrix per classifier")
        for clf, w in zip(self.classifiers, self.weights, strict=True):
            if w.dim() != 2 or w.shape != (len(self.top_k), len(clf.classes)):
                raise InvalidInputError(
                    f"weights for {clf.name!r} must be [{len(self.top_k)}, {len(clf.classes)}], "
                    f"got {tuple(w.shape)}"
                )
            if not torch.isfinite(w).all() or (w < 0).any():
                raise InvalidInputError(f"weights for {clf.name!r} must be finite and >= 0")

    @property
    def guided(self) -> torch.Tensor:
        """``[batch]`` bool: rows with some weight above zero."""
        flags = torch.zeros(len(self.top_k), dtype=torch.bool)
        for w in self.weights:
            flags |= (w > 0).any(-1)
        return flags

    @property
    def rho(self) -> torch.Tensor:
        """``[batch]`` float64: each row's ``plausible``."""
        assert self.plausible is not None  # filled in by __post_init__
        return self.plausible

    def select(self, rows: Sequence[int]) -> GuidanceSpec:
        index = torch.tensor(list(rows), dtype=torch.long)
        return GuidanceSpec(
            self.classifiers,
            tuple(w.index_select(0, index) for w in self.weights),
            self.top_k.index_select(0, index),
            self.rho.index_select(0, index),
        )


class GuidanceProcessor(LogitsProcessor):
    """Applies a :class:`GuidanceSpec` to ``generate``'s scores (see the module docstring).

    One instance serves one ``generate`` call; called again on a new sequence (its length
    not one more than at the previous call) it starts its classifiers over.
    """

    def __init__(self, spec: GuidanceSpec) -> None:
        self.spec = spec
        self.rows = spec.guided.nonzero().flatten()
        self.groups: dict[tuple[Any, ...], Backbone] = {}
        self.lead: dict[tuple[Any, ...], tuple[int, ...]] = {}
        for clf in spec.classifiers:
            key = self._key(clf)
            self.groups[key] = clf.backbone
            self.lead[key] = clf.config.lead_ids
        self._caches: dict[tuple[Any, ...], Any] = {}
        self._length: int | None = None

    @staticmethod
    def _key(clf: GuidanceClassifier) -> tuple[Any, ...]:
        return (*clf.backbone.key, clf.config.lead_ids)

    def _hidden(self, input_ids: torch.Tensor) -> dict[tuple[Any, ...], torch.Tensor]:
        """Advance every backbone by the newest token of the guided rows (or, at the first
        step, by the lead tokens); their last hidden states."""
        length = input_ids.shape[1]
        fresh = self._length is None or length != self._length + 1
        self._length = length
        if fresh:
            self._caches = {}
        hidden = {}
        for key, backbone in self.groups.items():
            if fresh:
                lead = torch.tensor(self.lead[key], dtype=torch.long, device=backbone.device)
                feed = lead.expand(len(self.rows), -1)
            else:
                feed = input_ids[self.rows.to(input_ids.device), -1:].to(backbone.device)
            states, self._caches[key] = backbone.forward(feed, cache=self._caches.get(key))
            hidden[key] = states[:, -1]
        return hidden

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not len(self.rows):
            return scores
        hidden = self._hidden(input_ids)
        rows = self.rows.to(scores.device)
        base = scores[rows].float().log_softmax(-1)
        top_k = self.spec.top_k[self.rows]
        floor = self._floor(base)
        out = scores.clone()
        full = (top_k == 0).nonzero().flatten()
        if len(full):
            total = self._full(base[full], hidden, full)
            if floor is not None:
                total = total.masked_fill(base[full] < floor[full, None], float("-inf"))
            out[rows[full]] = total.to(out.dtype)
        some = (top_k > 0).nonzero().flatten()
        if len(some):
            cut = None if floor is None else floor[some]
            out[rows[some]] = self._top_k(base[some], hidden, some, top_k[some], cut).to(out.dtype)
        return out  # type: ignore[return-value]

    def _floor(self, base: torch.Tensor) -> torch.Tensor | None:
        """Per guided row the smallest plausible base log-probability, log(max p) + log(rho)
        (-inf where rho = 0: no constraint); None when no row asks for one."""
        rho = self.spec.rho[self.rows]
        if not (rho > 0).any():
            return None
        return base.max(-1).values + rho.log().to(base.device, base.dtype)

    def _weights(self, n: int, sub: torch.Tensor) -> torch.Tensor:
        return self.spec.weights[n][self.rows[sub]]

    def _full(
        self, base: torch.Tensor, hidden: dict[tuple[Any, ...], torch.Tensor], sub: torch.Tensor
    ) -> torch.Tensor:
        total = base.clone()
        for n, clf in enumerate(self.spec.classifiers):
            weights = self._weights(n, sub).to(base.device)
            if not (weights > 0).any():
                continue
            log_p = clf.log_probs_full(hidden[self._key(clf)][sub.to(clf.backbone.device)])
            vocab = min(base.shape[1], log_p.shape[1])
            total[:, :vocab] += (log_p[:, :vocab].to(base.device) * weights[:, None, :]).sum(-1)
        return total

    def _top_k(
        self,
        base: torch.Tensor,
        hidden: dict[tuple[Any, ...], torch.Tensor],
        sub: torch.Tensor,
        ks: torch.Tensor,
        floor: torch.Tensor | None = None,
    ) -> torch.Tensor:
        values, ids = base.topk(int(ks.max()), dim=-1)
        total = values.clone()
        for n, clf in enumerate(self.spec.classifiers):
            weights = self._weights(n, sub).to(base.device)
            if not (weights > 0).any():
                continue
            device = clf.backbone.device
            vocab = clf.embeddings.shape[0]
            log_p = clf.log_probs_candidates(
                hidden[self._key(clf)][sub.to(device)], ids.clamp_max(vocab - 1).to(device)
            ).to(base.device)
            log_p = log_p.masked_fill((ids >= vocab)[..., None], 0.0)  # beyond its vocabulary
            total += (log_p * weights[:, None, :]).sum(-1)
        ranks = torch.arange(ids.shape[1], device=base.device)
        dropped = ranks[None, :] >= ks.to(base.device)[:, None]
        if floor is not None:
            dropped |= values < floor[:, None]  # never the first: it is the max
        total = total.masked_fill(dropped, float("-inf"))
        return torch.full_like(base, float("-inf")).scatter(1, ids, total)
