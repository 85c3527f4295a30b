"""The ``lora`` generation mode: each row of a batch through its user's LoRA adapter.

A row's user has an adapter when one is stored for them and this model
(:class:`fints.adapters.storage.AdapterStore`); the request says whether to use it
(:attr:`fints.modes.RowOwner.adapter`: ``None`` if there is one, ``True`` required,
``False`` never). Rows without one go through the base model (PEFT's ``"__base__"``).
Steering and other modes apply on top (the plug-in mode): their hooks sit on other
modules, so each row gets its own adapter and its own steering vectors in one batch.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from fints.adapters.files import AdapterError
from fints.adapters.host import BASE, AdapterHost
from fints.adapters.storage import AdapterStore, StoredAdapter
from fints.generation import Decoration

if TYPE_CHECKING:
    from fints.models import LoadedModel
    from fints.modes import BatchRows


@dataclass(frozen=True)
class LoraAddition:
    """Per row the adapter's name in the model (``"__base__"``: none) and its owner."""

    host: AdapterHost
    names: tuple[str, ...]
    owners: tuple[str | None, ...]  # whose adapter, for the results

    def select(self, rows: Sequence[int]) -> LoraAddition:
        return LoraAddition(
            self.host, tuple(self.names[i] for i in rows), tuple(self.owners[i] for i in rows)
        )

    def decoration(self, model: LoadedModel) -> Decoration:
        if model is not self.host.model:
            raise AdapterError("the adapters were loaded into another model")
        return Decoration(self.host.routing(self.names))

    def annotate(self, results: Sequence[Any]) -> None:
        for result, name, owner in zip(results, self.names, self.owners, strict=True):
            if name != BASE and hasattr(result, "adapter"):
                result.adapter = owner


class LoraMode:
    """Looks up each row's adapter and loads it into the model (once per weights)."""

    name: ClassVar[str] = "lora"

    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity
        self._hosts: dict[int, AdapterHost] = {}
        self._lock = threading.Lock()

    def host(self, model: LoadedModel) -> AdapterHost:
        with self._lock:
            host = self._hosts.get(id(model))
            if host is None or host.model is not model:
                host = self._hosts[id(model)] = AdapterHost(model, self.capacity)
            return host

    def prepare(self, rows: BatchRows) -> LoraAddition | None:
        owners = rows.owners
        if not owners or rows.model is None or rows.store is None:
            return None
        adapters = AdapterStore(rows.store, rows.model)
        host = self.host(rows.model)
        host.forget_deleted()  # a deleted user's weights leave the model at the next batch
        found: list[StoredAdapter | None] = []
        for owner in owners:
            if owner is None or owner.adapter is False:
                found.append(None)
            elif owner.adapter:
                found.append(adapters.require_user_adapter(owner.tenant, owner.user))
            else:
                found.append(adapters.user_adapter(owner.tenant, owner.user))
        if not any(found):
            return None
        keep = frozenset(s.name for s in found if s)
        names = tuple(host.load(s.folder, s.meta, keep) if s else BASE for s in found)
        return LoraAddition(host, names, tuple(s.meta.owner if s else None for s in found))
