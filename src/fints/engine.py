"""The personalization engine: history in, personalized generations out.

:class:`Personalizer` ties the pieces together for one loaded model: it stores
history, extracts dictionaries, and serves batches of (user, query) requests,
each row steered with its own user's retrieved and aggregated vectors.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import torch

from fints.backends import BACKENDS
from fints.dictionary import UserDictionary
from fints.encoders import KeyEncoder, SentenceTransformerEncoder
from fints.errors import InvalidInputError, UnknownUserError
from fints.extraction import ExtractionConfig, ExtractionResult, Extractor
from fints.extraction.config import extraction_for
from fints.generation import GenerationOptions
from fints.guidance.preferences import Preferences
from fints.history import ITEM_PROMPT_TOKENS, HistoryItem, clip_item
from fints.models import LoadedModel
from fints.modes import MODES, Addition, BatchRows, GenerationMode, RowOwner, SteeringMode
from fints.prompts import PromptTemplate, build_prompt_ids, encode_prompt, get_template
from fints.retrieval import nearest_items
from fints.sites import check_layers_in_range
from fints.steering import SteeringConfig
from fints.stopping import check_stops
from fints.store import DEFAULT_TENANT, Store, check_name
from fints.store_expiry import expire_items


class UnknownUser(StrEnum):
    """What to do with a request from a user the store does not know."""

    UNSTEERED = "unsteered"  # serve it unsteered and say so in the result's note
    ERROR = "error"  # raise UnknownUserError (the server answers 404)


@dataclass(frozen=True)
class GenerationRequest:
    """One query of one user. ``steering`` overrides the engine's defaults for this row;
    ``preferences`` asks for classifier guidance (the ``guidance`` mode)."""

    user: str | None
    query: str
    tenant: str = DEFAULT_TENANT
    steering: SteeringConfig | None = None
    raw_prompt: bool = False  # the query is the whole prompt text (no chat template)
    stop: tuple[str, ...] = ()  # decoding ends at the first of these; the text is cut before it
    preferences: Preferences | None = None
    adapter: bool | None = None  # the user's LoRA adapter: None if any, True required, False off

    def __post_init__(self) -> None:
        if not isinstance(self.query, str) or not self.query.strip():
            raise InvalidInputError("the query is empty")
        object.__setattr__(self, "stop", check_stops(self.stop))


@dataclass
class GenerationResult:
    user: str | None
    text: str
    steered: bool
    note: str = ""  # why a row was not steered, e.g. "user has no history"
    retrieved: list[str] = field(default_factory=list)  # item ids, best first
    weights: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    adapter: str | None = None  # whose LoRA adapter the row went through (lora mode)


@dataclass
class PreparedBatch:
    """Prompts and each mode's per-row additions (e.g. steering vectors), ready to decode."""

    prompts: list[list[int]]
    results: list[GenerationResult]  # text filled in after decoding
    stops: list[tuple[str, ...]]  # per row; empty: none
    additions: list[Addition] = field(default_factory=list)

    def select(self, rows: Sequence[int]) -> PreparedBatch:
        """The batch reduced to ``rows`` (e.g. without rows that failed a check)."""
        return PreparedBatch(
            [self.prompts[i] for i in rows],
            [self.results[i] for i in rows],
            [self.stops[i] for i in rows],
            [a.select(rows) for a in self.additions],
        )


def icl_context(
    dictionary: UserDictionary | None, key: torch.Tensor | None, config: SteeringConfig
) -> list[HistoryItem]:
    """The user's own ``config.icl_k`` history items most similar to the query, for the
    prompt (none without a dictionary with texts, or with ``icl_k=0``)."""
    if dictionary is None or key is None or not config.icl_k:
        return []
    by_id = {item.item_id: item for item in dictionary.items}
    known = [j for j, item_id in enumerate(dictionary.item_ids) if item_id in by_id]
    return nearest_items(
        dictionary.keys[known], [by_id[dictionary.item_ids[j]] for j in known], key, config.icl_k
    )


class Personalizer:
    """One model, one store, one key encoder; any number of tenants and users."""

    def __init__(
        self,
        model: LoadedModel,
        store: Store,
        *,
        encoder: KeyEncoder | None = None,
        template: str | PromptTemplate = "generic",
        steering: SteeringConfig | None = None,
        extraction: ExtractionConfig | None = None,
        unknown_user: UnknownUser | str = UnknownUser.UNSTEERED,
        modes: Sequence[str | GenerationMode] = (SteeringMode.name, "lora", "guidance"),
        backend: str = "transformers",
        item_prompt_tokens: int | None = ITEM_PROMPT_TOKENS,
    ) -> None:
        if item_prompt_tokens is not None and item_prompt_tokens < 1:
            raise InvalidInputError(
                f"item_prompt_tokens must be >= 1 or None, got {item_prompt_tokens!r}",
                param="item_prompt_tokens",
            )
        self.model = model
        #: the most tokens of an item's input, and of its output, in any prompt (None: all)
        self.item_prompt_tokens = item_prompt_tokens
        self.store = store
        self.encoder = encoder or SentenceTransformerEncoder()
        self.template = get_template(template)
        self.steering = steering or SteeringConfig()
        # None: the default method (trained) at its own default sites for this model
        self.extraction = extraction or ExtractionConfig.for_model(model.num_layers)
        check_layers_in_range(self.extraction.sites, model.num_layers)
        try:
            self.unknown_user = UnknownUser(unknown_user)
        except ValueError:
            raise InvalidInputError(
                f"unknown_user must be one of {[u.value for u in UnknownUser]}, "
                f"got {unknown_user!r}"
            ) from None
        names = [m for m in modes if isinstance(m, str)]
        unknown = [m for m in names if m not in MODES] + [b for b in [backend] if b not in BACKENDS]
        if unknown:
            raise InvalidInputError(
                f"unknown generation mode or backend {unknown}: modes {sorted(MODES)}, "
                f"backends {sorted(BACKENDS)}"
            )
        self.modes = [MODES[m]() if isinstance(m, str) else m for m in modes]
        self.backend = BACKENDS[backend](model)
        self._cache: dict[tuple[str, str], tuple[int, UserDictionary | None]] = {}
        # per tenant: extraction methods' tenant-level state (e.g. a trained shared vector)
        self._method_state: dict[str, dict[str, Any]] = {}
        self._cache_lock = threading.Lock()

    # -- history and dictionaries -------------------------------------------------------

    def add_history(
        self,
        user: str,
        items: Sequence[HistoryItem],
        *,
        tenant: str = DEFAULT_TENANT,
        build: bool = True,
        progress: bool = False,
    ) -> list[str]:
        """Store items and (by default) extract their entries right away."""
        ids = self.store.add_items(tenant, user, items)
        if build:
            self.build(user, tenant=tenant, progress=progress)
        return ids

    def build(
        self, user: str, *, tenant: str = DEFAULT_TENANT, progress: bool = True
    ) -> ExtractionResult | None:
        """Extract entries for every item of ``user`` that has none for this model yet."""
        steps = self.build_steps(user, tenant=tenant, progress=progress)
        results = [r for r in steps if r is not None]
        return results[0] if results else None

    def build_steps(
        self,
        user: str,
        *,
        tenant: str = DEFAULT_TENANT,
        chunk_items: int | None = None,
        progress: bool = False,
    ) -> Iterator[ExtractionResult | None]:
        """:meth:`build` in bounded steps, so a caller may do other work between them
        (the server decodes): chunks of at most ``chunk_items`` pending items (None: one
        chunk), each stored before the next starts and yielded; methods that refit the
        whole user run as one chunk but yield ``None`` after each piece of at most
        ``chunk_items`` examples of their training (:mod:`fints.steps`)."""
        pending = self.store.items_without_entries(tenant, user, self.model.fingerprint)
        if not self.store.has_user(tenant, user):
            raise UnknownUserError(f"unknown user {user!r} in tenant {tenant!r}")
        if not pending:
            return
        current = self.dictionary(user, tenant=tenant)
        # a user keeps the method and sites of their dictionary; a new one gets the engine's
        extraction = extraction_for(current.meta if current else None, self.extraction)
        settings = extraction.settings
        step = len(pending) if chunk_items is None or settings.rebuilds_all else chunk_items
        history = self._clipped(self.store.items(tenant, user))
        pool = self._clipped(
            self.store.sample_items(
                tenant,
                settings.pool_size,
                extraction.seed,
                exclude_user=None if settings.pool_includes_user else user,
            )
        )
        extractor = Extractor(self.model, self.encoder, self.template, extraction)
        for start in range(0, len(pending), max(1, step)):
            chunk = self._clipped(pending[start : start + step])
            result = yield from extractor.extract_steps(
                history if settings.rebuilds_all else chunk,
                history,
                pool,
                progress=progress,
                previous=self._current(user, tenant, extraction) if settings.rebuilds_all else None,
                shared=self._method_state.setdefault(tenant, {}),
                piece_items=chunk_items,
            )
            if result.entries:
                self.store.put_entries(tenant, user, result.meta, result.entries)
            yield result

    def _clipped(self, items: Sequence[HistoryItem]) -> list[HistoryItem]:
        """Items as prompts see them: each text cut to :attr:`item_prompt_tokens` tokens."""
        return [clip_item(self.model.tokenizer, i, self.item_prompt_tokens) for i in items]

    def _current(
        self, user: str, tenant: str, extraction: ExtractionConfig
    ) -> UserDictionary | None:
        """The user's dictionary, if made the way ``extraction`` extracts."""
        current = self.dictionary(user, tenant=tenant)
        if (
            current is None
            or not len(current)
            or current.meta.method != extraction.method
            or current.meta.sites != extraction.sites
        ):
            return None
        return current

    def dictionary(self, user: str, *, tenant: str = DEFAULT_TENANT) -> UserDictionary | None:
        """The user's dictionary for this model (cached until the user's data changes)."""
        version = self.store.version(tenant, user)
        if version is None:
            raise UnknownUserError(f"unknown user {user!r} in tenant {tenant!r}")
        with self._cache_lock:
            cached = self._cache.get((tenant, user))
            if cached is not None and cached[0] == version:
                return cached[1]
        dictionary = self.store.dictionary(tenant, user, self.model.fingerprint)
        if dictionary is not None:
            dictionary.meta.check_model(
                self.model.fingerprint, self.model.hidden_size, self.model.num_layers
            )
        with self._cache_lock:
            self._cache[(tenant, user)] = (version, dictionary)
        return dictionary

    def import_dictionary(
        self,
        dictionary: UserDictionary,
        *,
        user: str | None = None,
        tenant: str = DEFAULT_TENANT,
    ) -> None:
        """Store an exported dictionary, refusing one extracted from another model."""
        dictionary.meta.check_model(
            self.model.fingerprint, self.model.hidden_size, self.model.num_layers
        )
        self.store.import_dictionary(tenant, dictionary, user=user)

    def expire(self, older_than: datetime) -> int:
        """Forget history items stored before ``older_than`` (see
        :func:`fints.store_expiry.expire_items`); returns how many went."""
        removed = expire_items(self.store, older_than)
        for tenant in removed:
            self._method_state.pop(tenant, None)  # it may hold what expired items taught
        return sum(removed.values())

    def delete_user(self, user: str, *, tenant: str = DEFAULT_TENANT) -> None:
        self.store.delete_user(tenant, user)
        with self._cache_lock:
            self._cache.pop((tenant, user), None)
        self._method_state.pop(tenant, None)  # it may hold what was learned from the user

    # -- generation -------------------------------------------------------------------

    def _lookup(self, request: GenerationRequest) -> tuple[UserDictionary | None, str]:
        if request.user is None:
            return None, "no user given"
        check_name("user", request.user)
        try:
            dictionary = self.dictionary(request.user, tenant=request.tenant)
        except UnknownUserError:
            if self.unknown_user is UnknownUser.ERROR:
                raise
            return None, "unknown user: served unsteered"
        if dictionary is None or not len(dictionary):
            return None, "user has no dictionary for this model: served unsteered"
        return dictionary, ""

    def prepare(self, requests: Sequence[GenerationRequest]) -> PreparedBatch:
        """Retrieve, aggregate and scale each row's vectors; build each row's prompt."""
        if not requests:
            raise InvalidInputError("no requests")
        configs = [r.steering or self.steering for r in requests]
        found = [self._lookup(r) for r in requests]  # (dictionary or None, note)
        steered = [d if c.enabled else None for (d, _), c in zip(found, configs, strict=True)]
        with_icl = [d if c.icl_k else None for (d, _), c in zip(found, configs, strict=True)]
        results = [
            GenerationResult(
                user=r.user,
                text="",
                steered=d is not None,
                note=note if c.enabled else "steering disabled for this request",
            )
            for r, d, (_, note), c in zip(requests, steered, found, configs, strict=True)
        ]
        needs_key = [i for i in range(len(requests)) if steered[i] or with_icl[i]]
        encoded = self.encoder.encode([requests[i].query for i in needs_key]) if needs_key else None
        keys: list[torch.Tensor | None] = [None] * len(requests)
        if encoded is not None:
            for n, i in enumerate(needs_key):
                keys[i] = encoded[n]

        owners = [
            RowOwner(r.tenant, r.user, r.adapter) if r.user is not None else None for r in requests
        ]
        preferences = [r.preferences for r in requests]
        rows = BatchRows(steered, keys, configs, preferences, self.model, owners, self.store)
        additions = [a for a in (mode.prepare(rows) for mode in self.modes) if a is not None]
        for addition in additions:
            addition.annotate(results)
        prompts = [
            encode_prompt(self.model.tokenizer, r.query)
            if r.raw_prompt
            else build_prompt_ids(
                self.model.tokenizer,
                self.template,
                r.query,
                self._clipped(icl_context(d, keys[i], configs[i])),
            )
            for i, (r, d) in enumerate(zip(requests, with_icl, strict=True))
        ]
        for result, prompt in zip(results, prompts, strict=True):
            result.prompt_tokens = len(prompt)
        return PreparedBatch(prompts, results, [r.stop for r in requests], additions)

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        options: GenerationOptions | None = None,
        *,
        streamer: Any = None,
    ) -> list[GenerationResult]:
        """Personalized generation for a batch of requests from any users and tenants."""
        return self.decode(self.prepare(requests), options, streamer=streamer)

    def decode(
        self,
        prepared: PreparedBatch,
        options: GenerationOptions | None = None,
        *,
        streamer: Any = None,
    ) -> list[GenerationResult]:
        """Decode a prepared batch; fills in and returns its results, row by row."""
        completions = self.backend.decode(
            prepared.prompts,
            prepared.additions,
            options or GenerationOptions(),
            streamer=streamer,
            stops=prepared.stops,
        )
        for result, completion in zip(prepared.results, completions, strict=True):
            result.text = completion.text
            result.completion_tokens = len(completion.token_ids)
            result.finish_reason = completion.finish_reason
        return prepared.results
