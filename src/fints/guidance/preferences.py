"""What a request asks of guidance: per preference dimension (a classifier's name), a
weight (alpha) per class, how candidates are scored (the full vocabulary or the base
distribution's top k, FUDGE-style) and which candidates are plausible enough to choose
(``plausible`` = rho: base probability at least rho times the step's largest)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fints.errors import InvalidInputError

GuidanceMethod = Literal["full", "topk"]
METHODS: tuple[GuidanceMethod, ...] = ("full", "topk")
#: The largest weight accepted (beyond it one classifier decides alone anyway).
MAX_WEIGHT = 100.0
MAX_TOP_K = 1024


@dataclass(frozen=True)
class Preferences:
    """``weights[dimension][class]`` = alpha >= 0; ``method`` ``full`` scores every vocabulary
    token, ``topk`` only the base distribution's ``top_k`` best (the rest are dropped);
    ``plausible`` = rho in [0, 1]: only tokens whose base probability is at least rho times
    the step's most likely token's may be chosen (contrastive decoding's adaptive
    plausibility constraint; 0: every token, as without it)."""

    weights: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    method: GuidanceMethod = "full"
    top_k: int = 20
    plausible: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.weights, Mapping):
            raise InvalidInputError(
                'preferences must map a dimension to {class: weight}, e.g. {"mood": {"happy": '
                f"0.5}}}}, got {self.weights!r}",
                param="preferences",
            )
        clean: dict[str, dict[str, float]] = {}
        for dim, classes in self.weights.items():
            if not isinstance(dim, str) or not dim:
                raise InvalidInputError(
                    f"preference names must be strings, got {dim!r}", param="preferences"
                )
            if not isinstance(classes, Mapping) or not classes:
                raise InvalidInputError(
                    f"preferences.{dim} must map class names to weights, got {classes!r}",
                    param="preferences",
                )
            clean[dim] = {}
            for name, weight in classes.items():
                ok = isinstance(weight, int | float) and not isinstance(weight, bool)
                if not ok or not math.isfinite(weight) or not 0 <= weight <= MAX_WEIGHT:
                    raise InvalidInputError(
                        f"preferences.{dim}.{name}: a weight must be a finite number in "
                        f"[0, {MAX_WEIGHT:g}], got {weight!r}",
                        param="preferences",
                    )
                clean[dim][str(name)] = float(weight)
        object.__setattr__(self, "weights", clean)
        if self.method not in METHODS:
            raise InvalidInputError(
                f"guidance.method must be one of {list(METHODS)}, got {self.method!r}",
                param="guidance",
            )
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_TOP_K:
            raise InvalidInputError(
                f"guidance.top_k must be an integer in 1..{MAX_TOP_K}, got {k!r}", param="guidance"
            )
        rho = self.plausible
        number = isinstance(rho, int | float) and not isinstance(rho, bool)
        if not number or not math.isfinite(rho) or not 0 <= rho <= 1:
            raise InvalidInputError(
                f"guidance.plausible must be a finite number in [0, 1], got {rho!r}",
                param="guidance.plausible",
            )
        object.__setattr__(self, "plausible", float(rho))

    @property
    def active(self) -> bool:
        """Whether any weight is above zero (otherwise decoding is left untouched)."""
        return any(w > 0 for classes in self.weights.values() for w in classes.values())

    def describe(self) -> str:
        parts = [
            f"{dim}={name}:{w:g}"
            for dim, classes in self.weights.items()
            for name, w in classes.items()
            if w > 0
        ]
        how = "full vocabulary" if self.method == "full" else f"top {self.top_k}"
        if self.plausible > 0:
            how += f", plausible >= {self.plausible:g} x max"
        return f"guided ({how}): " + ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "preferences": {d: dict(c) for d, c in self.weights.items()},
            "guidance": {"method": self.method, "top_k": self.top_k, "plausible": self.plausible},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preferences | None:
        """From ``{"preferences": {...}, "guidance": {"method": ..., "top_k": ...,
        "plausible": ...}}`` (both optional); None when no preferences are given."""
        if not isinstance(data, Mapping):
            raise InvalidInputError(f"guidance settings must be an object, got {data!r}")
        weights = data.get("preferences")
        how = data.get("guidance") or {}
        if not isinstance(how, Mapping):
            raise InvalidInputError(
                f'guidance must be an object such as {{"method": "topk", "top_k": 20}}, '
                f"got {how!r}",
                param="guidance",
            )
        unknown = sorted(set(how) - {"method", "top_k", "plausible"})
        if unknown:
            raise InvalidInputError(
                f"unknown guidance setting(s) {unknown}: expected method, top_k, plausible",
                param="guidance",
            )
        if weights is None:
            return None
        return cls(
            weights, how.get("method", "full"), how.get("top_k", 20), how.get("plausible", 0.0)
        )


def parse_preference_flags(
    flags: list[str], method: str = "full", top_k: int = 20, plausible: float = 0.0
) -> Preferences | None:
    """Preferences from ``DIMENSION=CLASS:WEIGHT`` strings (``mood=happy:0.5``)."""
    weights: dict[str, dict[str, float]] = {}
    for flag in flags:
        dim, _, rest = flag.partition("=")
        name, _, weight = rest.rpartition(":")
        try:
            value = float(weight)
        except ValueError:
            value = math.nan
        if not dim or not name or math.isnan(value):
            raise InvalidInputError(
                f"--prefer takes DIMENSION=CLASS:WEIGHT, e.g. mood=happy:0.5, got {flag!r}",
                param="preferences",
            )
        weights.setdefault(dim, {})[name] = value
    if not weights:
        return None
    return Preferences(weights, method, top_k, plausible)  # type: ignore[arg-type]
