"""A user's own style classifier ('own-style'): trained from the store on first use, kept
in the user's folder, retrained when the history changes, per tenant, deleted with the
user, and refused with a clear error when there is too little history (tiny llama)."""

from __future__ import annotations

from collections.abc import Iterator
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
from fints.guidance.user_style import StyleSettings, style_folder
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
