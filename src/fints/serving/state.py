"""What one app holds: its configuration and the objects its handlers share.

:func:`~fints.serving.app.create_app` puts a :class:`ServerState` on
``app.state.fints``; handlers reach it with :func:`server_of`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from fints.engine import Personalizer, UnknownUser
from fints.errors import InvalidInputError
from fints.serving.batcher import KEEP_KV_MIB, PREFILL_TOKENS, SLICE_TOKENS, Batcher
from fints.serving.limits import ResourceLimits, TenantSlots
from fints.serving.metrics import ServingMetrics
from fints.serving.payloads import Limits
from fints.serving.tenants import TenantResolver


@dataclass(frozen=True)
class ServerConfig:
    """Everything the app needs besides the personalizer (which holds model and store)."""

    model_id: str | None = None  # the name clients send as "model"; None: the model's name
    limits: Limits = field(default_factory=Limits)
    resources: ResourceLimits = field(default_factory=ResourceLimits)
    max_batch_size: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 256
    engine: str = "transformers"  # what decodes: a name in fints.serving.engines.ENGINES
    # under contention (several tenants), a row decodes at most this many new tokens per
    # round, then yields to the others (None: rows decode whole); see serving.slicing
    slice_tokens: int | None = SLICE_TOKENS
    # a sliced row keeps its decoding state (KV cache) between slices, while the rows'
    # states take at most this many MiB (0: a row's prefix is decoded again each slice)
    keep_kv_mib: int = KEEP_KV_MIB
    # and a sliced row's long prompt is read this many ids per round (None: at once)
    prefill_tokens: int | None = PREFILL_TOKENS
    # a request naming a user without history: serve it unsteered, or answer 404 (ERROR)
    unknown_user: UnknownUser = UnknownUser.UNSTEERED
    extract_on_write: bool = True  # extract vectors when history is added (off: store only)
    # items extracted per step of a write; the worker decodes waiting requests between steps
    extract_chunk_items: int | None = 1  # None: a write extracts all its items in one step
    api_keys: Mapping[str, str] | None = None  # key -> tenant; None: single-tenant, no auth
    # forget history items older than this (None: keep them); checked at start and then
    # every expire_every_s, as a write on the model thread
    expire_after_s: float | None = None
    expire_every_s: float = 3600.0

    def __post_init__(self) -> None:
        if (self.expire_after_s is not None and self.expire_after_s <= 0) or (
            self.expire_every_s <= 0
        ):
            raise InvalidInputError("expire_after_s and expire_every_s must be > 0")
        if self.max_queue < 1 or self.max_batch_size < 1:
            raise InvalidInputError(
                f"max_queue and max_batch_size must be >= 1, got {self.max_queue} and "
                f"{self.max_batch_size}"
            )
        if self.slice_tokens is not None and self.slice_tokens < 1:
            raise InvalidInputError(f"slice_tokens must be >= 1 or None, got {self.slice_tokens}")
        if self.keep_kv_mib < 0:
            raise InvalidInputError(f"keep_kv_mib must be >= 0, got {self.keep_kv_mib}")
        if self.prefill_tokens is not None and self.prefill_tokens < 1:
            raise InvalidInputError(
                f"prefill_tokens must be >= 1 or None, got {self.prefill_tokens}"
            )
        if self.extract_chunk_items is not None and self.extract_chunk_items < 1:
            raise InvalidInputError(
                f"extract_chunk_items must be >= 1, got {self.extract_chunk_items}"
            )
        try:
            object.__setattr__(self, "unknown_user", UnknownUser(self.unknown_user))
        except ValueError:
            raise InvalidInputError(
                f"unknown_user must be one of {[u.value for u in UnknownUser]}, "
                f"got {self.unknown_user!r}"
            ) from None


@dataclass
class ServerState:
    """The personalizer, the configuration and the serving objects of one app."""

    personalizer: Personalizer
    config: ServerConfig
    model_id: str  # what clients send as "model"
    metrics: ServingMetrics
    batcher: Batcher  # writes (and generation, on the transformers engine)
    generation: Any  # fints.serving.engines.Generation: what generation requests go to
    tenants: TenantResolver
    slots: TenantSlots  # requests in progress per tenant
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def served(self) -> list[str]:
        """The model names this server answers to."""
        return sorted({self.model_id, self.personalizer.model.name})


def server_of(request: Request) -> ServerState:
    state = request.app.state.fints
    assert isinstance(state, ServerState)
    return state
