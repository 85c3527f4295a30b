"""Generation modes: what a request adds to plain decoding, as plug-ins.

A mode looks at a prepared batch's rows and returns an :class:`Addition`: plain data
(e.g. per-row steering vectors) that a backend knows how to apply while decoding.
Steering is the first mode; classifier-guided decoding and LoRA adapters are next,
each one module with a class registered in :data:`MODES`.

The transformers backend applies an addition through its :meth:`Addition.decoration`
(hooks inside a context manager, and logits processors); another backend (vLLM)
translates the same data its own way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from fints.generation import Decoration
from fints.injection import steer
from fints.plan import SteeringPlan, plan_steering
from fints.sites import Site

if TYPE_CHECKING:
    from fints.dictionary import UserDictionary
    from fints.guidance.preferences import Preferences
    from fints.models import LoadedModel
    from fints.steering import SteeringConfig
    from fints.store import Store


class Addition(Protocol):
    """A mode's per-row data for one batch."""

    def select(self, rows: Sequence[int]) -> Addition:
        """The same addition for a subset of the rows, in that order."""
        ...

    def decoration(self, model: LoadedModel) -> Decoration: ...

    def annotate(self, results: Sequence[Any]) -> None:
        """Record per row what the mode did (e.g. the retrieved item ids) in the results."""
        ...


@dataclass(frozen=True)
class BatchRows:
    """What modes see of a batch: per row, the user's dictionary, the query key, settings,
    guidance preferences (empty: none for any row); and the generator."""

    dictionaries: Sequence[UserDictionary | None]
    keys: Sequence[torch.Tensor | None]
    configs: Sequence[SteeringConfig]
    preferences: Sequence[Preferences | None] = ()
    model: LoadedModel | None = None
    owners: Sequence[RowOwner | None] = ()  # per row, whose request (empty: not known)
    store: Store | None = None


@dataclass(frozen=True)
class RowOwner:
    """Whose request a row is, and whether to use their LoRA adapter (``lora`` mode):
    None if they have one, True required (an error if not), False never."""

    tenant: str
    user: str
    adapter: bool | None = None


class GenerationMode(Protocol):
    name: ClassVar[str]

    def prepare(self, rows: BatchRows) -> Addition | None:
        """The addition for these rows (None: nothing to add)."""
        ...


# -- steering -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SteeringAddition:
    """Per-row vectors ``{site: [batch, hidden]}``, added at every prompt and new token,
    and per row the retrieved item ids and their weights."""

    vectors: dict[Site, torch.Tensor]
    retrieved: tuple[tuple[str, ...], ...]
    weights: tuple[tuple[float, ...], ...]

    @classmethod
    def of(cls, plan: SteeringPlan) -> SteeringAddition:
        return cls(plan.vectors(), plan.retrieved, plan.weights)

    def select(self, rows: Sequence[int]) -> SteeringAddition:
        index = torch.tensor(list(rows), dtype=torch.long)
        return SteeringAddition(
            {s: v.index_select(0, index) for s, v in self.vectors.items()},
            tuple(self.retrieved[i] for i in rows),
            tuple(self.weights[i] for i in rows),
        )

    def decoration(self, model: LoadedModel) -> Decoration:
        return Decoration(steer(model.layout, self.vectors))

    def annotate(self, results: Sequence[Any]) -> None:
        for result, ids, weights in zip(results, self.retrieved, self.weights, strict=True):
            result.retrieved, result.weights = list(ids), list(weights)


class SteeringMode:
    """Retrieve, aggregate and scale each row's vectors (:func:`fints.plan.plan_steering`)."""

    name: ClassVar[str] = "steering"

    def prepare(self, rows: BatchRows) -> SteeringAddition | None:
        plan = plan_steering(rows.dictionaries, rows.keys, rows.configs)
        return SteeringAddition.of(plan) if plan.sites else None


def _lora_mode() -> GenerationMode:
    """Per-user LoRA adapters (PEFT, mixed batches), stored beside the users' data."""
    from fints.adapters.mode import LoraMode

    return LoraMode()


def _guidance_mode() -> GenerationMode:
    """Classifier-guided decoding (CLIPer), classifiers from ``$FINTS_HOME/classifiers``."""
    from fints.guidance.mode import GuidanceMode

    return GuidanceMode()


#: Generation modes by name.
MODES: dict[str, Callable[[], GenerationMode]] = {
    SteeringMode.name: SteeringMode,
    "guidance": _guidance_mode,
    "lora": _lora_mode,
}
