"""What every extraction method shares: its config's JSON form, the registry, the result,
and the teacher-forced recording of per-site mean activations.

A method is one module with a typed config (a frozen dataclass named by ``name``)
and a class that turns history items into dictionary entries. Registering it is one
line: ``register(MyConfig, MyMethod)``; nothing else in fints names methods.
"""

from __future__ import annotations

import hashlib
import inspect
import random
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Self, TypeVar

import torch

from fints.dictionary import DictionaryEntry, DictionaryMeta, UserDictionary
from fints.encoders import KeyEncoder
from fints.errors import InvalidInputError
from fints.history import HistoryItem
from fints.models import LoadedModel
from fints.prompts import PromptTemplate, pad_batch
from fints.recording import record_means
from fints.sites import Site, default_sites
from fints.steps import Steps


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's settings; subclasses are frozen dataclasses with a ``name``."""

    name: ClassVar[str]

    def default_sites(self, num_layers: int) -> tuple[Site, ...]:
        """Where the method records and steers unless told otherwise: the sites it was
        measured at (the contrasts: attention and MLP outputs of the middle layer)."""
        return default_sites(num_layers)

    @property
    def pool_size(self) -> int:
        """How many items of the tenant's other users the method may draw from: enough
        for a seeded draw of ``negative_k`` per item, where the method has one."""
        return max(64, 4 * getattr(self, "negative_k", 0))

    def default_steering(self) -> dict[str, Any]:
        """How this method's vectors are steered where the caller names no strengths
        (``SteeringConfig.from_dict`` data; the CLI's ``generate``): a contrast vector is
        5-30 % of the activation norm, so a fraction of the site's typical norm."""
        return {"relative": True, "strengths": {"attn": 0.5, "mlp": 0.5, "block": 0.5}}

    @property
    def per_site(self) -> bool:
        """Whether an entry's vector at one site does not depend on the other sites (a
        recorded mean per site): extracted at many sites at once, any subset can steer.
        False for vectors trained jointly at their sites."""
        return True

    @property
    def pool_includes_user(self) -> bool:
        """Whether the pool samples the whole tenant, the user included (a shared part)."""
        return False

    @property
    def rebuilds_all(self) -> bool:
        """Whether a new item changes every entry of the user (a user-level fit), so that
        an update re-extracts the whole history, starting from the current vectors."""
        return False

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(
                f"unknown setting(s) {unknown} for extraction method {cls.name!r}: "
                f"expected some of {sorted(known)}",
                param=unknown[0],
            )
        try:
            return cls(**data)
        except TypeError as exc:
            raise InvalidInputError(f"bad settings for method {cls.name!r}: {exc}") from None


@dataclass(frozen=True)
class ExtractionJob:
    """What a method extracts from: the items to add and where their context comes from."""

    items: Sequence[HistoryItem]  # the items that need entries
    history: Sequence[HistoryItem]  # all of the user's items (own context)
    pool: Sequence[HistoryItem]  # other users' items of the same tenant
    previous: UserDictionary | None = None  # the user's current entries, made the same way


@dataclass
class ExtractionResult:
    meta: DictionaryMeta
    entries: list[DictionaryEntry]
    positive: torch.Tensor  # [N, sites, hidden] what the entry points to (e.g. mean activations)
    negative: torch.Tensor  # [N, sites, hidden] what it points away from
    skipped: list[str]  # item ids left out (e.g. the response contrast's filter)

    @property
    def differences(self) -> torch.Tensor:
        return self.positive - self.negative


@dataclass
class Sides:
    """A method's per-item output: kept item indices and both sides' activations."""

    kept: list[int]
    positive: torch.Tensor  # [kept, sites, hidden]
    negative: torch.Tensor
    norms: torch.Tensor  # [kept, sites] typical activation norms seen
    skipped: list[str]


C = TypeVar("C", bound=MethodConfig)


@dataclass(frozen=True)
class Registered:
    """A method: its config class and the function that turns a job into entry sides."""

    config: type[MethodConfig]
    run: Callable[[MethodContext, Any, ExtractionJob], Steps[Sides]]  # always in steps


#: Extraction methods by name: filled by each method's module, read by :mod:`.extractor`.
METHODS: dict[str, Registered] = {}


def register(
    config: type[C], run: Callable[[MethodContext, C, ExtractionJob], Sides | Steps[Sides]]
) -> None:
    """Register a method. ``run`` returns the sides, or is a generator function that
    yields between bounded pieces of work (long ones: the server decodes between them)."""
    if inspect.isgeneratorfunction(run):
        METHODS[config.name] = Registered(config, run)
        return

    def at_once(context: MethodContext, settings: Any, job: ExtractionJob) -> Steps[Sides]:
        return run(context, settings, job)  # type: ignore[return-value]
        yield

    METHODS[config.name] = Registered(config, at_once)


def method_names() -> tuple[str, ...]:
    return tuple(sorted(METHODS))


def method_config(name: str, data: Mapping[str, Any] | MethodConfig | None = None) -> MethodConfig:
    """The named method's typed config from JSON data (None: its defaults)."""
    if name not in METHODS:
        raise InvalidInputError(
            f"unknown extraction method {name!r}: expected one of {sorted(METHODS)}",
            param="method",
        )
    cls = METHODS[name].config
    if isinstance(data, MethodConfig):
        if not isinstance(data, cls):
            raise InvalidInputError(f"{type(data).__name__} is not a config of method {name!r}")
        return data
    return cls.from_dict(data or {})


def item_rng(seed: int, item_id: str) -> random.Random:
    """A random generator of its own per item: results do not depend on batching."""
    return random.Random(int(hashlib.sha256(f"{seed}:{item_id}".encode()).hexdigest()[:12], 16))


@dataclass(frozen=True)
class MethodContext:
    """The model side of extraction, shared by every method."""

    model: LoadedModel
    encoder: KeyEncoder
    template: PromptTemplate
    sites: tuple[Site, ...]
    batch_size: int
    max_target_tokens: int
    seed: int
    advance: Callable[[int], object] = lambda n: None  # progress: n more items done
    #: Tenant-level state a method may keep between users (e.g. a shared vector); the
    #: caller owns it and clears it when the tenant's data changes under it.
    shared: MutableMapping[str, Any] = field(default_factory=dict)
    #: The most examples a method in steps handles between two yields (None: a batch).
    piece_items: int | None = None

    def target_ids(self, text: str, *, end: bool = False) -> list[int]:
        """``text``'s tokens, at most ``max_target_tokens``; with ``end``, followed by the
        end-of-turn token when the whole text fits (a vector trained on these targets
        learns where an answer stops, not only how it goes on)."""
        tok = self.model.tokenizer
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        if end and tok.eos_token_id is not None and len(ids) < self.max_target_tokens:
            return [*ids, tok.eos_token_id]
        return ids[: self.max_target_tokens]

    def negative_context(
        self, item: HistoryItem, pool: Sequence[HistoryItem], k: int
    ) -> list[HistoryItem]:
        """``k`` other users' items, drawn for this item alone (seeded by its id)."""
        k = min(k, len(pool))
        return item_rng(self.seed, item.item_id).sample(list(pool), k) if k else []

    def means(
        self, prompts: list[list[int]], targets: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-force each target after its prompt; per-site mean and norm over its tokens."""
        sequences = [p + t for p, t in zip(prompts, targets, strict=True)]
        tok = self.model.tokenizer
        input_ids, attention = pad_batch(sequences, tok.pad_token_id, side="right")
        token_mask = torch.zeros_like(attention, dtype=torch.bool)
        for row, (p, t) in enumerate(zip(prompts, targets, strict=True)):
            token_mask[row, len(p) : len(p) + len(t)] = True
        device = self.model.device
        recorded = record_means(
            self.model.model,
            self.model.layout,
            self.sites,
            input_ids.to(device),
            attention.to(device),
            token_mask.to(device),
        )
        return recorded.means, recorded.norms

    def chunks(self, n: int) -> list[list[int]]:
        return [list(range(s, min(s + self.batch_size, n))) for s in range(0, n, self.batch_size)]
