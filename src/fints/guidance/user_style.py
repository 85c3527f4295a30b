"""A user's own style classifier: kept with the user's data, trained when first asked for.

``{"own-style": {"own": w}}`` in a request's preferences guides decoding towards the
requesting user's style: a classifier of the user's history outputs (class ``own``)
against other users' outputs of the same tenant (class ``other``, a seeded sample of at
most :attr:`StyleSettings.max_others`). It lives in the user's folder beside the store
(``Store.files_dir(tenant, user) / "style"``), so it is isolated per tenant and deleted
with the user, and it reads the generator's own first layers (same tokenizer, no second
model). Nothing has to be run by hand: the first request that asks for it trains it,
and so does the first one after the user's history changed (measured: ~2 s for a user of
10 items on SmolLM2, one CPU thread; BENCHMARKS.md "Own style without a training step").
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fints.errors import InvalidInputError
from fints.guidance.classifier import CONFIG_FILE, Backbone, GuidanceClassifier, read_config
from fints.guidance.recipes import style_texts
from fints.guidance.training import Progress, TrainConfig, train_classifier
from fints.history import HistoryItem
from fints.models import LoadedModel
from fints.store import Store

STYLE_DIR = "style"
#: The preference that names the requesting user's classifier, and the name it is saved
#: under (its folder is the user's); ``OWN`` is the user's class (the other: "other").
OWN_STYLE, OWN = "own-style", "own"


@dataclass(frozen=True)
class StyleSettings:
    """How a user's style classifier is trained (``fints guidance train-style``'s
    defaults: the first 10 layers, 8 epochs over the first 48 tokens of each output, the
    two classes weighted equally, a temperature fitted on the held-out fifth)."""

    layers: int = 10
    epochs: int = 8
    max_tokens: int = 48
    max_others: int = 256  # other users' outputs sampled for the "other" class
    seed: int = 0
    balanced: bool = True  # the user's few outputs weigh as much as the others' many
    calibrate: bool = True  # temperature-scaled on the held-out outputs

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            max_tokens=self.max_tokens,
            epochs=self.epochs,
            seed=self.seed,
            balanced=self.balanced,
            calibrate=self.calibrate,
        )


#: The training settings a kept classifier must share with the ones asked for to be
#: reused (what makes its probabilities usable for guidance); classifiers trained before
#: they existed lack them and are retrained. Others (epochs, tokens) may differ: a
#: classifier trained ahead with ``fints guidance train-style --epochs 12`` is kept.
CURRENT_SETTINGS = ("balanced", "calibrate")


def style_folder(store: Store, tenant: str, user: str) -> Path:
    return store.files_dir(tenant, user) / STYLE_DIR


def style_is_current(
    store: Store,
    tenant: str,
    user: str,
    backbone: Backbone,
    settings: StyleSettings | None = None,
) -> bool:
    """Whether the user has a style classifier on ``backbone`` trained on their history
    as it is now, with ``settings``' :data:`CURRENT_SETTINGS` (class balance, calibration)."""
    folder = style_folder(store, tenant, user)
    if not (folder / CONFIG_FILE).is_file():
        return False
    config = read_config(folder)
    data = config.metrics.get("data", {})
    kept = config.metrics.get("settings", {})
    wanted = (settings or StyleSettings()).train_config().to_dict()
    return (
        config.backbone_key == backbone.key
        and data.get("history") == _history_digest(store.items(tenant, user))
        and isinstance(kept, dict)
        and all(kept.get(k) == wanted[k] for k in CURRENT_SETTINGS)
    )


def _history_digest(items: Sequence[HistoryItem]) -> str:
    """What a classifier was trained on: a digest of the user's item ids, in order."""
    return hashlib.sha256("\n".join(i.item_id for i in items).encode()).hexdigest()


def train_user_style(
    store: Store,
    backbone: Backbone,
    tenant: str,
    user: str,
    settings: StyleSettings | None = None,
    progress: Progress | None = None,
) -> GuidanceClassifier:
    """Train the user's style classifier on the store's current history and keep it in
    the user's folder (replacing the old one whole: never a half-written classifier)."""
    settings = settings or StyleSettings()
    items = store.items(tenant, user)
    others = store.sample_items(tenant, settings.max_others, settings.seed, exclude_user=user)
    if len(items) < 2 or len(others) < 2:
        raise InvalidInputError(
            f"preference 'own-style' for user {user!r} needs >= 2 of the user's history items "
            f"and >= 2 of other users' in tenant {tenant!r}; there are {len(items)} and "
            f"{len(others)}",
            param="preferences",
        )
    train, test = style_texts([i.output for i in items], [i.output for i in others], OWN)
    data: dict[str, Any] = {
        "recipe": "style",
        "own": len(items),
        "others": len(others),
        "history": _history_digest(items),
    }
    classifier = train_classifier(
        OWN_STYLE, backbone, train, test, settings.train_config(), progress, {"data": data}
    )
    folder = style_folder(store, tenant, user)
    fresh = folder.with_name(f"{STYLE_DIR}.new")
    shutil.rmtree(fresh, ignore_errors=True)
    classifier.save(fresh)
    shutil.rmtree(folder, ignore_errors=True)
    fresh.rename(folder)
    return classifier


def style_layers(model: LoadedModel, settings: StyleSettings) -> int:
    """The backbone's depth for ``model``: ``settings.layers``, at most the model's."""
    return max(1, min(settings.layers, model.num_layers))
