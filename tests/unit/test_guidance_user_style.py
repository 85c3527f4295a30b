"""A user's own style classifier ('own-style'): trained from the store on first use, kept
in the user's folder, retrained when the history changes, per tenant, deleted with the
user, and refused with a clear error when there is too little history (tiny llama)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fints.engine import GenerationRequest, Personalizer
from fints.errors import InvalidInputError
from fints.generation import GenerationOptions
from fints.guidance.classifier import read_config
from fints.guidance.library import ClassifierLibrary
from fints.guidance.mode import GuidanceMode
from fints.guidance.preferences import Preferences
from fints.guidance.user_style import StyleSettings, style_folder, style_is_current
from fints.history import HistoryItem
from fints.models import LoadedModel
from fints.steering import SteeringConfig
from fints.store import Store
from tests.unit.benchmark_fixtures import HashEncoder, tiny_llama

OPTIONS = GenerationOptions(max_new_tokens=5, ignore_eos=True)
OWN = Preferences({"own-style": {"own": 8.0}})
OFF = SteeringConfig(enabled=False)
WORDS = {"ann": "arr matey ahoy", "bob": "indeed one notes", "other": "well well well"}


def items(user: str, n: int, start: int = 0) -> list[HistoryItem]:
    return [
        HistoryItem(f"question {i}", f"{WORDS[user]} {i} {WORDS[user]}", f"{user}-{i}")
        for i in range(start, start + n)
    ]


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    torch.set_num_threads(1)
    return tiny_llama()


@pytest.fixture
def engine(model: LoadedModel, tmp_path: Path) -> Iterator[Personalizer]:
    store = Store(tmp_path / "store.sqlite")
    mode = GuidanceMode(ClassifierLibrary(tmp_path / "lib"), StyleSettings(layers=2, epochs=2))
    engine = Personalizer(model, store, encoder=HashEncoder(), modes=("steering", mode))
    for user in ("ann", "bob"):
        store.add_items("default", user, items(user, 6))
    yield engine
    store.close()


def ask(engine: Personalizer, user: str | None, prefs: Preferences | None = OWN, **kw) -> str:
    request = GenerationRequest(user, "question 9", steering=OFF, preferences=prefs, **kw)
    return engine.generate([request], OPTIONS)[0].text


def test_the_first_request_trains_the_users_classifier_and_later_ones_reuse_it(
    engine: Personalizer,
) -> None:
    folder = style_folder(engine.store, "default", "ann")
    assert not folder.exists()
    guided = ask(engine, "ann")
    config = read_config(folder)
    assert config.classes == ("other", "own")
    assert config.metrics["data"]["own"] == 6 and config.metrics["data"]["others"] == 6
    assert "test" in config.metrics  # a fifth of each side held out and measured
    stamp = (folder / "classifier.json").stat().st_mtime_ns
    assert ask(engine, "ann") == guided
    assert (folder / "classifier.json").stat().st_mtime_ns == stamp  # kept, not retrained
    assert guided != ask(engine, "ann", None)  # it guides
    engine.store.add_items("default", "ann", items("ann", 1, start=6))
    ask(engine, "ann")
    assert read_config(folder).metrics["data"]["own"] == 7  # the history changed: retrained


def test_rows_of_two_users_in_one_batch_each_get_their_own(engine: Personalizer) -> None:
    both = [
        GenerationRequest(u, "question 9", steering=OFF, preferences=OWN) for u in ("ann", "bob")
    ]
    together = [r.text for r in engine.generate(both, OPTIONS)]
    assert together == [ask(engine, "ann"), ask(engine, "bob")]
    assert style_folder(engine.store, "default", "bob").is_dir()


def test_it_is_per_tenant_and_deleted_with_the_user(engine: Personalizer) -> None:
    engine.store.add_items("t2", "ann", items("bob", 3))
    engine.store.add_items("t2", "other", items("other", 3))  # a user may be called "other"
    ask(engine, "ann")
    ask(engine, "ann", tenant="t2")
    ask(engine, "other", tenant="t2")
    mine, theirs = (style_folder(engine.store, t, "ann") for t in ("default", "t2"))
    assert mine != theirs and mine.is_dir() and theirs.is_dir()
    assert read_config(theirs).metrics["data"]["own"] == 3
    engine.delete_user("ann", tenant="t2")
    assert not theirs.exists() and mine.is_dir()


def test_too_little_history_is_a_clear_error_and_stores_nothing(engine: Personalizer) -> None:
    engine.store.add_items("default", "cy", items("other", 1))
    with pytest.raises(InvalidInputError, match=r"'own-style' for user 'cy' needs >= 2"):
        ask(engine, "cy")
    assert not style_folder(engine.store, "default", "cy").exists()
    with pytest.raises(InvalidInputError, match="needs a user"):
        ask(engine, None)
    with pytest.raises(InvalidInputError, match="takes one class, 'own'"):
        ask(engine, "ann", Preferences({"own-style": {"ann": 1.0}}))


def test_it_is_balanced_and_calibrated_and_one_trained_before_that_is_retrained(
    engine: Personalizer,
) -> None:
    """The kept classifier records its class balance and temperature; one that does not
    (trained before they existed) is not reused but trained again, the same history."""
    ask(engine, "ann")
    folder = style_folder(engine.store, "default", "ann")
    config = read_config(folder)
    settings = config.metrics["settings"]
    assert settings["balanced"] is True and settings["calibrate"] is True
    cal = config.metrics["calibration"]
    assert cal["on"] == "test" and config.temperature == pytest.approx(cal["temperature"], 1e-3)
    assert cal["nll_after"] <= cal["nll_before"]
    assert "text_balanced_accuracy" in config.metrics["test"]
    mode = next(m for m in engine.modes if isinstance(m, GuidanceMode))
    backbone = mode.library.backbone_of(engine.model, 2)
    assert style_is_current(engine.store, "default", "ann", backbone, mode.style)
    old = json.loads((folder / "classifier.json").read_text())
    for key in ("balanced", "calibrate", "calibration_share"):
        del old["metrics"]["settings"][key]
    del old["metrics"]["calibration"], old["temperature"]
    (folder / "classifier.json").write_text(json.dumps(old))
    assert read_config(folder).temperature == 1.0  # an old file still loads
    assert not style_is_current(engine.store, "default", "ann", backbone, mode.style)
    ask(engine, "ann")
    again = read_config(folder)
    assert again.metrics["settings"]["balanced"] is True and "calibration" in again.metrics
    assert again.temperature == config.temperature  # retrained the same way (seeded)
    unbalanced = replace(mode.style, balanced=False)
    assert not style_is_current(engine.store, "default", "ann", backbone, unbalanced)
    longer = replace(mode.style, epochs=5)  # other settings keep a classifier current
    assert style_is_current(engine.store, "default", "ann", backbone, longer)
