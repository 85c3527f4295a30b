"""The classifiers on disk: one folder each (named after its preference dimension) under
``$FINTS_HOME/classifiers`` or a given folder; loaded on first use and kept, with
classifiers on the same backbone sharing one loaded copy of it."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path

from fints.errors import FintsError, InvalidInputError
from fints.guidance.classifier import (
    CONFIG_FILE,
    Backbone,
    ClassifierConfig,
    GuidanceClassifier,
    load_classifier,
    read_config,
)
from fints.models import LoadedModel, load_model
from fints.paths import fints_home

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def default_classifier_dir() -> Path:
    return fints_home() / "classifiers"


def check_classifier_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidInputError(
            f"a classifier name is 1-64 letters, digits, '_', '.' or '-', got {name!r}",
            param="preferences",
        )
    return name


class ClassifierLibrary:
    """Classifiers by name. ``load_backbone(name)`` loads a backbone model (default:
    :func:`fints.models.load_model` in float32 on ``device``)."""

    def __init__(
        self,
        folder: str | Path | None = None,
        *,
        device: str = "cpu",
        load_backbone: Callable[[str], LoadedModel] | None = None,
    ) -> None:
        self.folder = Path(folder) if folder is not None else default_classifier_dir()
        self._load = load_backbone or (lambda n: load_model(n, dtype="float32", device=device))
        self._backbones: dict[tuple[str, int], Backbone] = {}
        self._classifiers: dict[str, tuple[float, GuidanceClassifier]] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(p.name for p in self.folder.iterdir() if (p / CONFIG_FILE).is_file())

    def config(self, name: str) -> ClassifierConfig:
        return read_config(self._path(name))

    def _path(self, name: str) -> Path:
        path = self.folder / check_classifier_name(name)
        if not (path / CONFIG_FILE).is_file():
            raise InvalidInputError(
                f"unknown preference {name!r}: the classifiers in {self.folder} are "
                f"{self.names()} (and 'own-style', the requesting user's)",
                param="preferences",
            )
        return path

    def add_backbone(self, backbone: Backbone) -> None:
        """Use this loaded backbone for classifiers trained on it (tests, training)."""
        with self._lock:
            self._backbones[backbone.key] = backbone

    def backbone(self, config: ClassifierConfig) -> Backbone:
        with self._lock:
            found = self._backbones.get(config.backbone_key)
        if found is not None:
            return found
        loaded = self._load(config.backbone)
        if loaded.fingerprint != config.backbone_fingerprint:
            raise FintsError(
                f"classifier {config.name!r} was trained on another {config.backbone!r} "
                f"(fingerprint {config.backbone_fingerprint[:12]}, loaded "
                f"{loaded.fingerprint[:12]})"
            )
        backbone = Backbone(loaded, config.layers, owned=True)
        with self._lock:
            return self._backbones.setdefault(backbone.key, backbone)

    def backbone_of(self, model: LoadedModel, layers: int) -> Backbone:
        """The first ``layers`` layers of a loaded model as a backbone, made once (a copy
        of the model) and kept for the classifiers trained on it."""
        with self._lock:
            found = self._backbones.get((model.fingerprint, layers))
        if found is not None:
            return found
        backbone = Backbone(model, layers)
        with self._lock:
            return self._backbones.setdefault(backbone.key, backbone)

    def get(self, name: str) -> GuidanceClassifier:
        """The classifier ``name`` (reloaded when its files change on disk)."""
        path = self._path(name)
        stamp = (path / CONFIG_FILE).stat().st_mtime
        with self._lock:
            cached = self._classifiers.get(name)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        classifier = self.load(path)
        with self._lock:
            self._classifiers[name] = (stamp, classifier)
        return classifier

    def load(self, path: Path) -> GuidanceClassifier:
        """The classifier saved in ``path``, on its backbone, not kept (a user's own style
        classifier is read from the user's folder each time: gone when the user is)."""
        return load_classifier(path, self.backbone(read_config(path)))

    def save(self, classifier: GuidanceClassifier) -> Path:
        path = classifier.save(self.folder / check_classifier_name(classifier.name))
        self.add_backbone(classifier.backbone)
        return path
