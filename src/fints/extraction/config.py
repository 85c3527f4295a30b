"""Extraction settings: where to record, which registered method, and its own settings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fints.dictionary import DictionaryMeta
from fints.errors import InvalidInputError
from fints.extraction.base import MethodConfig, method_config
from fints.sites import Site
from fints.steering import parse_sites_param

#: The extraction method a new user's history goes through unless another is named:
#: trained vectors (BENCHMARKS.md, "Trained vectors: shared + per-user delta"). The
#: paper's contrasts stay options ("context", "response").
DEFAULT_METHOD = "trained"


@dataclass(frozen=True)
class ExtractionConfig:
    """``method`` names a registered method; ``params`` are its typed settings (None or a
    dict: parsed by the method's config class, defaults for what is left out).
    :meth:`for_model` also picks the method's own default sites."""

    sites: tuple[Site, ...]
    method: str = DEFAULT_METHOD
    params: MethodConfig | Mapping[str, Any] | None = field(default=None, compare=True)
    batch_size: int = 8
    max_target_tokens: int = 160
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", parse_sites_param(self.sites))
        if self.params is not None and not isinstance(self.params, Mapping | MethodConfig):
            raise InvalidInputError(
                f"params must be an object of the method's settings, got {self.params!r}",
                param="params",
            )
        object.__setattr__(self, "params", method_config(self.method, self.params))
        for name in ("batch_size", "max_target_tokens", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (name != "seed"):
                raise InvalidInputError(
                    f"{name} must be an integer >= {int(name != 'seed')}, got {value!r}",
                    param=name,
                )

    @classmethod
    def for_model(
        cls,
        num_layers: int,
        *,
        method: str | None = None,
        sites: str | Sequence[str | Site] | None = None,
        params: MethodConfig | Mapping[str, Any] | None = None,
        **options: Any,
    ) -> ExtractionConfig:
        """Settings for a model of ``num_layers`` layers: ``method`` (None: the default
        method) at ``sites`` (None: the method's own default sites for this model)."""
        name = method or DEFAULT_METHOD
        settings = method_config(name, params)
        chosen = settings.default_sites(num_layers) if sites is None else sites
        return cls(sites=chosen, method=name, params=settings, **options)  # type: ignore[arg-type]

    @property
    def settings(self) -> MethodConfig:
        assert isinstance(self.params, MethodConfig)
        return self.params

    def with_(self, **changes: Any) -> ExtractionConfig:
        if "method" in changes and "params" not in changes:
            changes["params"] = None  # another method: its own defaults
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sites": [str(s) for s in self.sites],
            "method": self.method,
            "params": self.settings.to_dict(),
            "batch_size": self.batch_size,
            "max_target_tokens": self.max_target_tokens,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExtractionConfig:
        known = {"sites", "method", "params", "batch_size", "max_target_tokens", "seed"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(
                f"unknown extraction setting(s) {unknown}: expected some of {sorted(known)}",
                param=unknown[0],
            )
        if "sites" not in data:
            raise InvalidInputError("extraction settings need 'sites'", param="sites")
        return cls(**data)


def extraction_for(meta: DictionaryMeta | None, default: ExtractionConfig) -> ExtractionConfig:
    """How a user's new items are extracted: ``default`` for a user without a dictionary
    (or one made the same way), else the way their dictionary was made, so that a user
    keeps their method and sites (e.g. a dictionary built with the context contrast before
    trained vectors became the default keeps growing with the context contrast)."""
    if meta is None or (meta.method == default.method and meta.sites == default.sites):
        return default
    try:
        return ExtractionConfig.from_dict({**meta.method_config, "sites": meta.sites})
    except InvalidInputError:  # settings recorded by an older version: the method's defaults
        return ExtractionConfig(sites=meta.sites, method=meta.method, seed=default.seed)
