"""Classifier guidance as a generation mode (``fints.modes.MODES["guidance"]``): each
row's :class:`~fints.guidance.preferences.Preferences` become one
:class:`~fints.guidance.processor.GuidanceProcessor` for the whole batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fints.errors import InvalidInputError
from fints.generation import Decoration
from fints.guidance.classifier import tokenizer_fingerprint
from fints.guidance.library import ClassifierLibrary
from fints.guidance.preferences import Preferences
from fints.guidance.processor import GuidanceProcessor, GuidanceSpec
from fints.guidance.user_style import (
    OWN,
    OWN_STYLE,
    StyleSettings,
    style_folder,
    style_is_current,
    style_layers,
    train_user_style,
)

if TYPE_CHECKING:
    from fints.guidance.classifier import GuidanceClassifier
    from fints.models import LoadedModel
    from fints.modes import BatchRows, RowOwner
    from fints.store import Store


@dataclass(frozen=True)
class GuidanceAddition:
    """The batch's classifiers and per-row weights, and per row what was asked."""

    spec: GuidanceSpec
    described: tuple[str, ...]  # per row; empty: not guided

    def select(self, rows: Sequence[int]) -> GuidanceAddition:
        return GuidanceAddition(self.spec.select(rows), tuple(self.described[i] for i in rows))

    def decoration(self, model: LoadedModel) -> Decoration:
        return Decoration(logits_processors=(GuidanceProcessor(self.spec),))

    def annotate(self, results: Sequence[Any]) -> None:
        for result, text in zip(results, self.described, strict=True):
            if text:
                result.note = f"{result.note}; {text}" if result.note else text


def guidance_spec(
    preferences: Sequence[Preferences | None],
    classifiers: Mapping[str, GuidanceClassifier],
) -> GuidanceSpec:
    """Per classifier (by preference name) a ``[rows, classes]`` weight matrix; per row
    its ``top_k`` (0: full) and ``plausible`` (0: off). A class a classifier does not know
    is refused, naming the known ones."""
    names = sorted(classifiers)
    by_name = {name: n for n, name in enumerate(names)}
    weights = [torch.zeros(len(preferences), len(classifiers[n].classes)) for n in names]
    top_k = torch.zeros(len(preferences), dtype=torch.long)
    plausible = torch.zeros(len(preferences), dtype=torch.float64)
    for row, prefs in enumerate(preferences):
        if prefs is None:
            continue
        top_k[row] = prefs.top_k if prefs.method == "topk" else 0
        plausible[row] = prefs.plausible
        for dim, classes in prefs.weights.items():
            clf = classifiers[dim]
            for name, weight in classes.items():
                if name not in clf.classes:
                    raise InvalidInputError(
                        f"unknown class {name!r} for preference {dim!r}: expected some of "
                        f"{list(clf.classes)}",
                        param="preferences",
                    )
                weights[by_name[dim]][row, clf.classes.index(name)] = weight
    return GuidanceSpec(tuple(classifiers[n] for n in names), tuple(weights), top_k, plausible)


def _check_own(classes: Any) -> None:
    if set(classes) != {OWN}:
        raise InvalidInputError(
            f"preference {OWN_STYLE!r} takes one class, {OWN!r} (the requesting user's "
            f"style), got {sorted(classes)}",
            param="preferences",
        )


def own_key(owner: RowOwner) -> str:
    """The name a row's own style classifier goes by in a batch (no library name can be
    it: those hold no ':')."""
    return f"{OWN_STYLE}:{owner.tenant}:{owner.user}"


def own_style(prefs: Preferences | None, owner: RowOwner | None) -> Preferences | None:
    """``prefs`` with ``own-style`` renamed to the row's user's classifier (:func:`own_key`)."""
    if prefs is None or OWN_STYLE not in prefs.weights:
        return prefs
    _check_own(prefs.weights[OWN_STYLE])
    if owner is None:
        raise InvalidInputError(
            f"preference {OWN_STYLE!r} needs a user: it guides towards the user's own style",
            param="preferences",
        )
    weights = {d: dict(c) for d, c in prefs.weights.items() if d != OWN_STYLE}
    weights[own_key(owner)] = dict(prefs.weights[OWN_STYLE])
    return Preferences(weights, prefs.method, prefs.top_k, prefs.plausible)


class GuidanceMode:
    """Looks up each asked-for classifier in ``library`` (default: ``$FINTS_HOME/
    classifiers``) and checks it reads the generator's tokenizer; a user's own style
    classifier comes from the user's folder in the store, trained there first when it is
    missing or older than the user's history (``style``: how)."""

    name: ClassVar[str] = "guidance"

    def __init__(
        self, library: ClassifierLibrary | None = None, style: StyleSettings | None = None
    ) -> None:
        self.library = library or ClassifierLibrary()
        self.style = style or StyleSettings()
        self._fingerprints: dict[int, tuple[Any, str]] = {}  # id(tokenizer) -> fingerprint

    def _fingerprint(self, tokenizer: Any) -> str:
        known = self._fingerprints.get(id(tokenizer))
        if known is None or known[0] is not tokenizer:
            known = self._fingerprints[id(tokenizer)] = (
                tokenizer,
                tokenizer_fingerprint(tokenizer),
            )
        return str(known[1])

    def check(self, preferences: Preferences, tokenizer: Any) -> None:
        """Refuse unknown preference or class names and classifiers trained for another
        tokenizer, from the classifiers' configs alone (nothing is loaded)."""
        mine = self._fingerprint(tokenizer)
        for dim, classes in preferences.weights.items():
            if dim == OWN_STYLE:
                _check_own(classes)
                continue  # the user's own, on the generator's layers: same tokenizer
            config = self.library.config(dim)
            unknown = sorted(set(classes) - set(config.classes))
            if unknown:
                raise InvalidInputError(
                    f"unknown class {unknown[0]!r} for preference {dim!r}: expected some of "
                    f"{list(config.classes)}",
                    param="preferences",
                )
            if config.tokenizer_fingerprint != mine:
                raise InvalidInputError(
                    f"classifier {dim!r} was trained for another tokenizer "
                    f"({config.tokenizer_fingerprint[:12]}, backbone {config.backbone!r}) "
                    f"than the generator's ({mine[:12]}): guidance needs the same vocabulary",
                    param="preferences",
                )

    def own_classifier(
        self, model: LoadedModel, store: Store, owner: RowOwner
    ) -> GuidanceClassifier:
        """The row's user's style classifier, trained now if missing or out of date."""
        backbone = self.library.backbone_of(model, style_layers(model, self.style))
        if not style_is_current(store, owner.tenant, owner.user, backbone, self.style):
            train_user_style(store, backbone, owner.tenant, owner.user, self.style)
        return self.library.load(style_folder(store, owner.tenant, owner.user))

    def prepare(self, rows: BatchRows) -> GuidanceAddition | None:
        asked = list(rows.preferences) or [None] * len(rows.configs)
        if not any(p is not None and p.active for p in asked):
            return None
        owners = list(rows.owners) or [None] * len(asked)
        if rows.model is not None:
            for prefs in [p for p in asked if p is not None]:
                self.check(prefs, rows.model.tokenizer)
        preferences = [own_style(p, o) for p, o in zip(asked, owners, strict=True)]
        classifiers: dict[str, GuidanceClassifier] = {}
        for wanted, owner in zip(asked, owners, strict=True):
            if wanted is None or OWN_STYLE not in wanted.weights or owner is None:
                continue
            if rows.model is None or rows.store is None:
                raise InvalidInputError(
                    f"preference {OWN_STYLE!r} needs the generator and the user's store",
                    param="preferences",
                )
            key = own_key(owner)
            if key not in classifiers:
                classifiers[key] = self.own_classifier(rows.model, rows.store, owner)
        for name in {d for p in preferences if p is not None for d in p.weights} - set(classifiers):
            classifiers[name] = self.library.get(name)
        spec = guidance_spec(preferences, classifiers)
        described = tuple(p.describe() if p is not None and p.active else "" for p in preferences)
        return GuidanceAddition(spec, described)
