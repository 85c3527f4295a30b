"""Trained vectors are the default for a new user (issue 21), at the method's own default
sites, everywhere a default is chosen; the contrasts stay options, and a user whose
dictionary was built with the context contrast keeps being served and extended with it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import fints.extraction.trained as trained_module
import fints.models
import fints.serving.factory as factory
from fints.dictionary import UserDictionary
from fints.engine import GenerationRequest, Personalizer
from fints.extraction import DEFAULT_METHOD, ExtractionConfig, TrainedConfig, method_config
from fints.generation import GenerationOptions
from fints.history import HistoryItem
from fints.models import LoadedModel
from fints.sites import parse_sites
from fints.store import Store
from tests.unit.benchmark_fixtures import HashEncoder, tiny_llama

OPTIONS = GenerationOptions(max_new_tokens=2)


def history(user: str, n: int) -> list[HistoryItem]:
    return [
        HistoryItem(f"{user} asks {i}", f"{user} answers {i}!", f"{user}-{i}") for i in range(n)
    ]


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return tiny_llama()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "store.sqlite") as db:
        yield db


def test_the_default_method_is_trained_at_its_own_sites() -> None:
    assert DEFAULT_METHOD == "trained"
    config = ExtractionConfig.for_model(30)
    assert config.method == "trained" and config.sites == parse_sites("15.block")
    assert config.settings == TrainedConfig()
    # the contrasts keep the middle layer's attention and MLP outputs
    assert ExtractionConfig.for_model(30, method="context").sites == parse_sites("15.attn+mlp")
    assert method_config("response").default_sites(28) == parse_sites("14.attn+mlp")
    # explicit sites and settings are kept
    chosen = ExtractionConfig.for_model(30, method="context", sites="10.attn", batch_size=3)
    assert (chosen.sites, chosen.batch_size) == (parse_sites("10.attn"), 3)
    assert ExtractionConfig(sites=parse_sites("3.mlp")).method == "trained"


def test_a_new_engine_server_and_cli_default_to_trained(
    tiny: LoadedModel, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Personalizer(tiny, store, encoder=HashEncoder())
    assert engine.extraction == ExtractionConfig.for_model(tiny.num_layers)
    assert engine.extraction.sites == parse_sites("2.block")  # 4 layers: the middle one

    monkeypatch.setattr(factory, "load_model", lambda *a, **k: tiny)
    served = factory.build_personalizer(store=tmp_path / "served.sqlite")
    assert (served.extraction.method, served.extraction.sites) == (
        "trained",
        parse_sites("2.block"),
    )
    contrast = factory.build_personalizer(store=tmp_path / "c.sqlite", method="context")
    assert contrast.extraction.sites == parse_sites("2.attn+mlp")
    pinned = factory.build_personalizer(store=tmp_path / "p.sqlite", sites="1.block")
    assert (pinned.extraction.method, pinned.extraction.sites) == (
        "trained",
        parse_sites("1.block"),
    )
    for p in (served, contrast, pinned):
        p.store.close()

    from fints.cli import _engine

    monkeypatch.setattr(fints.models, "load_model", lambda *a, **k: tiny)
    cli = _engine(store, None, "auto", None, "generic")
    assert (cli.extraction.method, cli.extraction.sites) == ("trained", parse_sites("2.block"))
    assert _engine(store, None, "auto", None, "generic", "response").extraction.method == "response"


def shared_trainings(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of examples (trained on and held out) of every training of a shared
    vector from now on."""
    shared = TrainedConfig().training("shared")
    calls: list[int] = []
    train = trained_module.training_steps

    def counting(model: Any, sites: Any, examples: Any, **kwargs: Any) -> Any:
        if kwargs.get("config") == shared:
            calls.append(len(examples) + len(kwargs.get("valid") or []))
        return train(model, sites, examples, **kwargs)

    monkeypatch.setattr(trained_module, "training_steps", counting)
    return calls


def test_the_first_build_trains_the_tenants_shared_vector_once_per_tenant(
    tiny: LoadedModel, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Personalizer(tiny, store, encoder=HashEncoder())
    calls = shared_trainings(monkeypatch)
    engine.add_history("ann", history("ann", 4))
    assert calls == [4]  # the tenant's first build: the shared vector, on the pool
    engine.add_history("bob", history("bob", 3))  # the pool (7) has not doubled: kept
    engine.add_history("ann", history("ann", 5)[4:])  # a new item: incremental, no shared
    assert calls == [4]
    engine.add_history("cy", history("cy", 3), tenant="other")  # another tenant: its own
    assert calls == [4, 3]
    for user, tenant in (("ann", "default"), ("bob", "default"), ("cy", "other")):
        dictionary = engine.dictionary(user, tenant=tenant)
        assert dictionary is not None and dictionary.meta.method == "trained"
        assert dictionary.meta.sites == parse_sites("2.block")


def test_a_context_dictionary_is_still_served_extended_and_exported(
    tiny: LoadedModel, store: Store, tmp_path: Path
) -> None:
    old = Personalizer(
        tiny,
        store,
        encoder=HashEncoder(),
        extraction=ExtractionConfig.for_model(tiny.num_layers, method="context"),
    )
    old.add_history("ann", history("ann", 3))
    old.add_history("bob", history("bob", 3))
    made = old.dictionary("ann")
    assert made is not None and made.meta.method == "context"

    new = Personalizer(tiny, store, encoder=HashEncoder())  # the default: trained
    assert new.extraction.method == "trained"
    [served] = new.generate([GenerationRequest("ann", "ann asks 1")], OPTIONS)
    assert served.steered and served.retrieved
    # a new item of ann's is extracted the way her dictionary was made
    new.add_history("ann", [HistoryItem("ann asks more", "ann answers more", "ann-new")])
    grown = new.dictionary("ann")
    assert grown is not None and grown.meta.method == "context"
    assert grown.meta.sites == parse_sites("2.attn+mlp") and "ann-new" in grown.item_ids
    for item_id, vector in zip(made.item_ids, made.vectors, strict=True):  # kept as they were
        assert (grown.vectors[grown.item_ids.index(item_id)] == vector).all()
    # a new user of the same store gets trained vectors
    new.add_history("cy", history("cy", 3))
    cy = new.dictionary("cy")
    assert cy is not None and cy.meta.method == "trained"
    # an exported context dictionary imports into a default engine and is served
    made.save(tmp_path / "ann")
    new.import_dictionary(UserDictionary.load(tmp_path / "ann"), user="ann2")
    [again] = new.generate([GenerationRequest("ann2", "ann asks 1")], OPTIONS)
    assert again.steered and again.retrieved
    imported = new.dictionary("ann2")
    assert imported is not None and imported.meta.method == "context"


def test_generate_steers_each_method_at_its_own_default_unless_a_flag_says_otherwise(
    tiny: LoadedModel, store: Store
) -> None:
    from fints.cli_steering import user_steering

    contrast = ExtractionConfig.for_model(tiny.num_layers, method="context")
    Personalizer(tiny, store, encoder=HashEncoder(), extraction=contrast).add_history(
        "ann", history("ann", 3)
    )
    engine = Personalizer(tiny, store, encoder=HashEncoder())
    engine.add_history("cy", history("cy", 3))
    as_trained = user_steering(engine, "cy", "default", {})
    assert not as_trained.relative and set(as_trained.strengths.values()) == {1.0}
    assert user_steering(engine, "nobody", "default", {}) == as_trained  # a new user's method
    assert user_steering(engine, None, "default", {}) == as_trained
    old = user_steering(engine, "ann", "default", {})
    assert old.relative and set(old.strengths.values()) == {0.5}
    flagged = user_steering(engine, "cy", "default", {"strengths": {"block": 2.0}, "top_k": 2})
    assert flagged.strengths["block"] == 2.0 and flagged.strengths["attn"] == 1.0
    assert flagged.top_k == 2 and not flagged.relative
    [result] = engine.generate([GenerationRequest("cy", "cy asks 1", steering=as_trained)], OPTIONS)
    assert result.steered
