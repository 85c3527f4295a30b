"""LoRA adapters on disk: standard PEFT folders (``adapter_config.json`` and
``adapter_model.safetensors``, loadable by ``PeftModel.from_pretrained``) plus
``fints_adapter.json`` (:class:`AdapterMeta`: the base model's fingerprint, the
weights' digest, how it was trained).

Every read checks what it reads: the recorded base model against the model in use,
the weights against their digest, the tensors' names and shapes against the config.
A write is staged in a sibling folder and renamed into place, so a reader sees the old
adapter or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fints.adapters.config import AdapterMeta, LoraTrainConfig
from fints.dictionary import now_iso
from fints.errors import InvalidInputError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "fints_adapter.json"
#: The prefix PEFT gives the keys of a saved adapter (``PeftModel`` -> ``LoraModel`` -> model).
SAVED_PREFIX = "base_model.model."


class AdapterError(InvalidInputError):
    """An adapter that cannot be used: missing, for another model, or damaged."""


@dataclass(frozen=True)
class AdapterWeights:
    """A LoRA adapter in memory: PEFT's config and its saved state dict."""

    config: Any  # peft.LoraConfig
    state: dict[str, torch.Tensor]  # PEFT's saved names: base_model.model.<path>.lora_A.weight

    @property
    def rank(self) -> int:
        return int(self.config.r)

    @property
    def scaling(self) -> float:
        return float(self.config.lora_alpha) / int(self.config.r)

    @property
    def parameters(self) -> int:
        return sum(t.numel() for t in self.state.values())

    def model_state(self) -> dict[str, torch.Tensor]:
        """The state dict keyed relative to the bare model (for ``set_peft_model_state_dict``
        on a model with the layers injected in place)."""
        return {k.removeprefix(SAVED_PREFIX): v for k, v in self.state.items()}


def lora_config(train: LoraTrainConfig, model_name: str, *, inference: bool = False) -> Any:
    """PEFT's config for ``train`` (a ``peft.LoraConfig``)."""
    from peft import LoraConfig

    return LoraConfig(
        r=train.r,
        lora_alpha=train.alpha,
        lora_dropout=0.0 if inference else train.dropout,
        target_modules=list(train.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=model_name,
        inference_mode=inference,
    )


def compose(task: AdapterWeights, user: AdapterWeights) -> AdapterWeights:
    """One adapter equal to ``task`` plus ``user`` (rank ``r_task + r_user``, scaling 1).

    ``B @ A`` of the result is ``s_t B_t A_t + s_u B_u A_u``: the ``A`` matrices stacked
    over the rank, each ``B`` scaled by its adapter's scaling, side by side.
    """
    from peft import LoraConfig

    if set(task.state) != set(user.state):
        raise AdapterError("the task and user adapters adapt different modules")
    rank = task.rank + user.rank
    state: dict[str, torch.Tensor] = {}
    for key, t in task.state.items():
        u = user.state[key]
        if key.endswith("lora_A.weight"):
            state[key] = torch.cat([t, u.to(t.dtype)], dim=0).contiguous()
        elif key.endswith("lora_B.weight"):
            parts = [t * task.scaling, u.to(t.dtype) * user.scaling]
            state[key] = torch.cat(parts, dim=1).contiguous()
        else:
            raise AdapterError(f"unexpected tensor {key!r} in a LoRA adapter")
    config = LoraConfig(**{**task.config.to_dict(), "r": rank, "lora_alpha": rank})
    return AdapterWeights(config, state)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def write_adapter(folder: Path, weights: AdapterWeights, meta: dict[str, Any]) -> AdapterMeta:
    """Write (or replace) the adapter in ``folder``; ``meta``: the :class:`AdapterMeta`
    fields but the digest and the date, which are filled in here."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder.parent))
    try:
        weights.config.save_pretrained(str(staging))
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in weights.state.items()},
            str(staging / WEIGHTS_FILE),
        )
        full = AdapterMeta(
            **meta, weights_sha256=sha256_file(staging / WEIGHTS_FILE), created_at=now_iso()
        )
        (staging / META_FILE).write_text(json.dumps(full.to_json(), indent=1))
        old = folder.with_name(f".old-{folder.name}-{staging.name}")
        if folder.exists():
            folder.rename(old)
        staging.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return full


def read_meta(folder: Path) -> AdapterMeta:
    path = folder / META_FILE
    try:
        return AdapterMeta.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        raise AdapterError(f"{folder} is not a fints adapter: {META_FILE} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
        raise AdapterError(f"{path} is damaged: {exc}") from None


def check_base(meta: AdapterMeta, fingerprint: str, model_name: str) -> None:
    if meta.model_fingerprint != fingerprint:
        raise AdapterError(
            f"the adapter of {meta.owner!r} was trained on another base model "
            f"({meta.model_name!r}, fingerprint {meta.model_fingerprint[:12]}), not on "
            f"{model_name!r} ({fingerprint[:12]}); train one for this model"
        )


def read_adapter(
    folder: Path, fingerprint: str, model_name: str, expected: dict[str, tuple[int, ...]]
) -> tuple[AdapterWeights, AdapterMeta]:
    """Read and check an adapter for the model with ``fingerprint``; ``expected``: the
    shape of every LoRA matrix the config implies on that model (see
    :func:`fints.adapters.host.expected_shapes`)."""
    meta = read_meta(folder)
    check_base(meta, fingerprint, model_name)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file() or not (folder / CONFIG_FILE).is_file():
        raise AdapterError(f"{folder} lacks {WEIGHTS_FILE} or {CONFIG_FILE}")
    if sha256_file(weights_path) != meta.weights_sha256:
        raise AdapterError(
            f"{weights_path} is damaged: its digest does not match the one recorded when "
            "it was written"
        )
    from peft import LoraConfig

    try:
        config = LoraConfig.from_pretrained(str(folder))
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise AdapterError(f"{folder} is damaged: {exc}") from None
    weights = AdapterWeights(config, state)
    shapes = {k.removeprefix(SAVED_PREFIX): tuple(v.shape) for k, v in state.items()}
    if shapes != expected:
        wrong = sorted(set(shapes.items()) ^ set(expected.items()))[:3]
        raise AdapterError(f"{folder}: its tensors do not fit this model (e.g. {wrong})")
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise AdapterError(f"{folder}: tensor {bad[0]!r} holds NaN or infinity")
    return weights, meta
