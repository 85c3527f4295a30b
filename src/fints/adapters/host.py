"""The LoRA adapters loaded into one model, and per-row routing while it decodes.

Adapters are injected into the model in place with PEFT (``inject_adapter_in_model``,
``set_peft_model_state_dict``), each under its weights' digest, and made inactive: a
plain forward pass (extraction, recording, a batch without adapters) is the base model's.
Only inside :meth:`AdapterHost.routing` does each row of a batch go through its own
adapter, via PEFT's mixed-batch argument ``adapter_names`` (``"__base__"``: none),
passed by forward pre-hooks that the context manager removes on exit.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from fints.adapters.config import AdapterMeta
from fints.adapters.files import AdapterError, AdapterWeights, read_adapter
from fints.models import LoadedModel

#: PEFT's name for "no adapter" in ``adapter_names``.
BASE = "__base__"


def _targets(config: Any) -> set[str]:
    modules = config.target_modules
    return {modules} if isinstance(modules, str) else set(modules)


def expected_shapes(model: nn.Module, config: Any) -> dict[str, tuple[int, ...]]:
    """Every LoRA matrix ``config`` puts on ``model``, by name relative to the model."""
    from peft.tuners.lora import LoraLayer

    targets, rank = _targets(config), int(config.r)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, module in model.named_modules():
        if name.endswith(".base_layer") or name.rsplit(".", 1)[-1] not in targets:
            continue
        base = module.get_base_layer() if isinstance(module, LoraLayer) else module
        if not isinstance(base, nn.Linear):
            continue
        shapes[f"{name}.lora_A.weight"] = (rank, base.in_features)
        shapes[f"{name}.lora_B.weight"] = (base.out_features, rank)
    return shapes


def lora_layers(model: nn.Module) -> list[Any]:
    """The model's PEFT LoRA layers (``peft.tuners.lora.LoraLayer``)."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _route(
    _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], names: list[str]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    rows = int(args[0].shape[0]) if args else len(names)
    kwargs["adapter_names"] = names * rows if len(names) == 1 else names
    return args, kwargs


class AdapterHost:
    """Loads stored adapters into ``model`` (at most ``capacity``, least recently used out)."""

    def __init__(self, model: LoadedModel, capacity: int = 32) -> None:
        self.model = model
        self.capacity = capacity
        #: loaded adapters, least recently used first, with the folder each came from
        self._recent: OrderedDict[str, Path | None] = OrderedDict()
        self._in_use: dict[str, int] = {}  # name -> batches decoding with it now
        self._lock = threading.Lock()

    def loaded(self) -> set[str]:
        if not self._recent:
            return set()  # nothing loaded by this host: no need to import peft
        layers = lora_layers(self.model.model)
        return set(layers[0].lora_A.keys()) if layers else set()

    def load(
        self, folder: Path, meta: AdapterMeta | None = None, keep: frozenset[str] = frozenset()
    ) -> str:
        """Load the adapter stored in ``folder`` (checked: base model, digest, shapes) unless
        an adapter with the same weights is loaded already; returns its name. Adapters in
        ``keep`` (the rest of a batch) and in use by a decoding batch are not evicted."""
        with self._lock:
            if meta is not None and meta.name in self.loaded():
                self._recent[meta.name] = folder
                self._recent.move_to_end(meta.name)
                return meta.name
            probe = read_meta_config(folder)
            expected = expected_shapes(self.model.model, probe)
            weights, meta = read_adapter(folder, self.model.fingerprint, self.model.name, expected)
            if meta.name not in self.loaded():
                self._inject(meta.name, weights)
            self._recent[meta.name] = folder
            self._recent.move_to_end(meta.name)
            self._evict(keep={meta.name, *keep})
            return meta.name

    def add(self, name: str, weights: AdapterWeights) -> None:
        """Load adapter weights held in memory under ``name``."""
        with self._lock:
            if name not in self.loaded():
                self._inject(name, weights)
            self._recent[name] = None

    def _inject(self, name: str, weights: AdapterWeights) -> None:
        from peft import inject_adapter_in_model, set_peft_model_state_dict

        # Injected with B = 0 (PEFT's default init: no effect) and made inactive before its
        # weights are set, so a forward pass in another thread (extraction) never sees it.
        config = replace(weights.config, inference_mode=True, init_lora_weights=True)
        model = self.model.model
        try:
            inject_adapter_in_model(config, model, adapter_name=name)
            for layer in lora_layers(model):
                layer.set_adapter([])  # inactive: plain forward passes stay the base model's
            result: Any = set_peft_model_state_dict(model, weights.model_state(), adapter_name=name)
            if hasattr(model, "peft_config"):
                del model.peft_config  # left by the injection; adapters here are ours alone
        except (ValueError, RuntimeError, KeyError) as exc:
            self._drop(name)
            raise AdapterError(f"the adapter does not fit this model: {exc}") from None
        missing = [k for k in result.missing_keys if f".{name}." in k or k.endswith(name)]
        if result.unexpected_keys or missing:
            self._drop(name)
            raise AdapterError(
                f"the adapter does not fit this model (unexpected {result.unexpected_keys[:2]}, "
                f"missing {missing[:2]})"
            )
        model.requires_grad_(False)

    def _drop(self, name: str) -> None:
        for layer in lora_layers(self.model.model):
            layer.delete_adapter(name)
            layer.set_adapter([])
        self._recent.pop(name, None)

    def _evict(self, keep: set[str]) -> None:
        while len(self._recent) > self.capacity:
            busy = keep | {n for n, count in self._in_use.items() if count}
            victim = next((n for n in self._recent if n not in busy), None)
            if victim is None:
                return
            self._drop(victim)

    def forget_deleted(self) -> list[str]:
        """Unload the adapters whose folder is gone (their user was deleted), unless a
        batch is decoding with one; returns their names."""
        with self._lock:
            gone = [
                name
                for name, folder in self._recent.items()
                if folder is not None and not folder.exists() and not self._in_use.get(name)
            ]
            for name in gone:
                self._drop(name)
            return gone

    def unload(self, name: str) -> None:
        with self._lock:
            self._drop(name)

    @contextmanager
    def routing(self, names: Sequence[str]) -> Iterator[None]:
        """Each row ``i`` of every forward pass in the block goes through adapter
        ``names[i]`` (``"__base__"``: none); one name applies to every row."""
        used = {n for n in names if n != BASE}
        with self._lock:
            unknown = sorted(used - self.loaded())
            if unknown:
                raise AdapterError(f"adapter(s) {unknown} are not loaded into this model")
            for name in used:
                self._in_use[name] = self._in_use.get(name, 0) + 1
        handles = [
            layer.register_forward_pre_hook(partial(_route, names=list(names)), with_kwargs=True)
            for layer in lora_layers(self.model.model)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            with self._lock:
                for name in used:
                    self._in_use[name] -= 1


def read_meta_config(folder: Path) -> Any:
    """The adapter's PEFT config, read only to know what shapes to expect."""
    from peft import LoraConfig

    try:
        return LoraConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as exc:
        raise AdapterError(f"{folder}: unreadable adapter config: {exc}") from None
