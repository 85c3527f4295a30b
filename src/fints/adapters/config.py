"""Settings of LoRA training and what a stored adapter records about itself (JSON)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from fints.errors import InvalidInputError

#: The kinds of adapter fints trains: a tenant's task LoRA (all users' histories) and a
#: user's LoRA (their own history, on top of the task LoRA when there is one).
KINDS = ("task", "user")


@dataclass(frozen=True)
class LoraTrainConfig:
    """LoRA training settings; the defaults are OPPU's (r=8, alpha=8, q_proj and v_proj,
    2 epochs, lr 1e-4). The loss is the mean NLL of the output tokens only."""

    r: int = 8
    alpha: int = 8
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    epochs: int = 2
    lr: float = 1e-4
    batch_size: int = 4
    max_target_tokens: int = 64  # an output longer than this is cut
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str) or not isinstance(
            self.target_modules, list | tuple
        ):
            raise InvalidInputError(
                f"target_modules must be a list of module names, got {self.target_modules!r}",
                param="target_modules",
            )
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        ints = {"r": self.r, "epochs": self.epochs, "batch_size": self.batch_size}
        ints["max_target_tokens"] = self.max_target_tokens
        for name, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InvalidInputError(f"seed must be an integer, got {self.seed!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int) or self.alpha < 1:
            raise InvalidInputError(f"alpha must be an integer >= 1, got {self.alpha!r}")
        if not _positive(self.lr):
            raise InvalidInputError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not _number(self.dropout) or not 0 <= self.dropout < 1:
            raise InvalidInputError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(
            isinstance(m, str) and m for m in self.target_modules
        ):
            raise InvalidInputError(
                f"target_modules must be non-empty module names, got {self.target_modules!r}"
            )

    @property
    def scaling(self) -> float:
        return float(self.alpha) / self.r

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraTrainConfig:
        if not isinstance(data, dict):
            raise InvalidInputError(f"a LoRA config must be a JSON object, got {data!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(f"unknown LoRA setting(s) {unknown}: expected {sorted(known)}")
        return cls(**data)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _positive(value: object) -> bool:
    return _number(value) and math.isfinite(float(value)) and float(value) > 0  # type: ignore[arg-type]


@dataclass(frozen=True)
class AdapterMeta:
    """What fints records beside a stored PEFT adapter (``fints_adapter.json``).

    ``weights_sha256`` is the digest of ``adapter_model.safetensors``: a file that does
    not match it is refused. A user adapter made on top of a task adapter holds both
    (its rank is ``task_rank + user_rank``), so it is complete on its own.
    """

    kind: str  # "task" or "user"
    tenant: str
    owner: str  # the user, or the task's name
    model_fingerprint: str
    model_name: str
    weights_sha256: str
    train_config: dict[str, Any]
    task_rank: int = 0  # rank of the task adapter folded in (0: none)
    user_rank: int = 0
    task_sha256: str = ""  # the task adapter's weights it was trained on
    items: int = 0  # history items trained on
    train_seconds: float = 0.0
    created_at: str = ""
    format_version: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidInputError(f"adapter kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def name(self) -> str:
        """The adapter's name inside a model: its weights' digest (same weights, one copy)."""
        return f"lora_{self.weights_sha256[:24]}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> AdapterMeta:
        if not isinstance(data, dict):
            raise InvalidInputError("fints_adapter.json must hold a JSON object")
        known = {f.name for f in fields(cls)}
        required = {"kind", "tenant", "owner", "model_fingerprint", "model_name"}
        missing = sorted((required | {"weights_sha256", "train_config"}) - set(data))
        if missing:
            raise InvalidInputError(f"fints_adapter.json lacks field(s) {missing}")
        return cls(**{k: v for k, v in data.items() if k in known})
