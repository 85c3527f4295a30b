"""Shared by the LoRA tests: a tiny random llama, a store with two users, and adapters
trained quickly (a high learning rate, so that they visibly change what the model says)."""

from __future__ import annotations

from pathlib import Path

from fints.adapters.config import LoraTrainConfig
from fints.adapters.storage import AdapterStore, StoredAdapter
from fints.adapters.training import LoraTrainer, TrainedAdapter, training_examples
from fints.history import HistoryItem
from fints.models import LoadedModel
from fints.prompts import get_template

FAST = LoraTrainConfig(lr=5e-2, epochs=2, batch_size=2, max_target_tokens=12)


def history(user: str, n: int = 4) -> list[HistoryItem]:
    return [
        HistoryItem(f"{user} asks about topic {i}", f"{user} says {i} {user} {user}", f"{user}{i}")
        for i in range(n)
    ]


def train_user(
    model: LoadedModel,
    user: str,
    config: LoraTrainConfig = FAST,
    trainer: LoraTrainer | None = None,
) -> TrainedAdapter:
    examples = training_examples(model, get_template("generic"), history(user), 12)
    return (trainer or LoraTrainer(model)).train(examples, config)


def store_user_adapter(
    adapters: AdapterStore, user: str, trained: TrainedAdapter, tenant: str = "default"
) -> StoredAdapter:
    return adapters.save_user(
        tenant,
        user,
        trained.weights,
        {
            "kind": "user",
            "model_fingerprint": adapters.model.fingerprint,
            "model_name": adapters.model.name,
            "train_config": FAST.to_dict(),
            "user_rank": trained.weights.rank,
            "items": trained.items,
        },
    )


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to prove nothing changed)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
