"""Extraction methods as a registry: configs as JSON, clear errors, and a new method is one
function plus ``register`` (the extractor and the dictionary metadata need no change)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from fints.dictionary import DictionaryMeta
from fints.errors import InvalidInputError
from fints.extraction import (
    METHODS,
    ExtractionConfig,
    ExtractionJob,
    Extractor,
    MethodConfig,
    MethodContext,
    Sides,
    register,
)
from fints.history import HistoryItem
from fints.layers import resolve_layout
from fints.models import LoadedModel
from fints.prompts import get_template
from fints.sites import parse_sites
from tests.conftest import tiny_model
from tests.unit.benchmark_fixtures import HashEncoder

SITES = parse_sites("1.attn+mlp")
TOY = "toy-registry-test"

#: Non-default settings for every built-in method, as JSON data.
NON_DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "context": {"context_k": 5, "negative_k": 2},
    "response": {"negative_k": 4, "rouge_threshold": 0.3, "rejected_max_new_tokens": 12},
}


@pytest.mark.parametrize("name", sorted(NON_DEFAULT_PARAMS))
def test_the_builtin_methods_are_registered(name):
    assert name in METHODS
    assert METHODS[name].config.name == name


@pytest.mark.parametrize("name", sorted(NON_DEFAULT_PARAMS))
def test_extraction_config_round_trips_through_json(name):
    config = ExtractionConfig(
        sites=SITES, method=name, params=NON_DEFAULT_PARAMS[name], batch_size=3, seed=7
    )
    data = json.loads(json.dumps(config.to_dict()))
    again = ExtractionConfig.from_dict(data)
    assert again == config
    assert again.settings.to_dict() == {
        **METHODS[name].config().to_dict(),
        **NON_DEFAULT_PARAMS[name],
    }


def test_settings_left_out_take_the_methods_defaults():
    config = ExtractionConfig.from_dict({"sites": "1.attn", "method": "response"})
    assert config.settings == METHODS["response"].config()


def test_switching_method_resets_params_to_the_new_methods_defaults():
    config = ExtractionConfig(sites=SITES, method="context", params={"context_k": 5})
    assert config.with_(method="response").settings == METHODS["response"].config()


def test_an_unknown_method_is_named():
    with pytest.raises(InvalidInputError, match="unknown extraction method 'nope'") as err:
        ExtractionConfig(sites=SITES, method="nope")
    assert err.value.param == "method"


def test_an_unknown_method_param_is_named():
    with pytest.raises(InvalidInputError, match=r"unknown setting\(s\) \['bogus'\]") as err:
        ExtractionConfig.from_dict({"sites": "1.attn", "params": {"bogus": 1}})
    assert err.value.param == "bogus"


def test_a_param_of_another_method_is_refused():
    with pytest.raises(InvalidInputError, match=r"'context_k'.*method 'response'") as err:
        ExtractionConfig(sites=SITES, method="response", params={"context_k": 1})
    assert err.value.param == "context_k"


def test_an_unknown_extraction_setting_is_named():
    with pytest.raises(InvalidInputError, match="unknown extraction setting") as err:
        ExtractionConfig.from_dict({"sites": "1.attn", "contrast": "context"})
    assert err.value.param == "contrast"


def test_extraction_settings_need_sites():
    with pytest.raises(InvalidInputError, match="need 'sites'") as err:
        ExtractionConfig.from_dict({"method": "context"})
    assert err.value.param == "sites"


# -- a new method ------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyConfig(MethodConfig):
    name = TOY

    scale: float = 1.0


def toy_method(context: MethodContext, config: ToyConfig, job: ExtractionJob) -> Sides:
    """Keeps every other item; its entry points from zero to ``scale`` times the item's rank."""
    kept = list(range(0, len(job.items), 2))
    shape = (len(kept), len(context.sites), context.model.hidden_size)
    ranks = torch.tensor(kept, dtype=torch.float32).view(-1, 1, 1) + 1
    return Sides(
        kept=kept,
        positive=config.scale * ranks * torch.ones(shape),
        negative=torch.zeros(shape),
        norms=torch.full((len(kept), len(context.sites)), 4.0),
        skipped=[job.items[i].item_id for i in range(1, len(job.items), 2)],
    )


@pytest.fixture
def toy() -> Iterator[str]:
    register(ToyConfig, toy_method)
    try:
        yield TOY
    finally:
        del METHODS[TOY]


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    m = tiny_model("llama")
    return LoadedModel(m, SimpleNamespace(pad_token_id=0), "tiny", "fp-tiny", resolve_layout(m))  # type: ignore[arg-type]


ITEMS = [HistoryItem(f"input {i}", f"output {i}", f"i{i}") for i in range(5)]


def extract_with_toy(model: LoadedModel, scale: float):
    config = ExtractionConfig(sites=SITES, method=TOY, params={"scale": scale})
    extractor = Extractor(model, HashEncoder(), get_template("generic"), config)
    return extractor.extract(ITEMS, ITEMS, [], progress=False), config


def test_a_registered_method_builds_the_entries(toy, model):
    result, _ = extract_with_toy(model, 2.0)
    assert [e.item_id for e in result.entries] == ["i0", "i2", "i4"]
    assert result.skipped == ["i1", "i3"]
    for rank, entry in zip((1, 3, 5), result.entries, strict=True):
        assert torch.equal(entry.vector.values, torch.full((len(SITES), 32), 2.0 * rank))


def test_a_registered_methods_entries_are_keyed_by_their_inputs(toy, model):
    result, _ = extract_with_toy(model, 1.0)
    expected = HashEncoder().encode(["input 0", "input 2", "input 4"])
    torch.testing.assert_close(torch.stack([e.key for e in result.entries]), expected)


def test_the_dictionary_records_the_method_and_its_settings(toy, model):
    result, config = extract_with_toy(model, 3.0)
    assert result.meta.method == TOY
    assert result.meta.method_config == config.to_dict()
    assert result.meta.method_config["params"] == {"scale": 3.0}
    assert result.meta.site_norms == (4.0, 4.0)


def test_recorded_settings_rebuild_the_same_config(toy, model):
    result, config = extract_with_toy(model, 3.0)
    meta = DictionaryMeta.from_json(json.loads(json.dumps(result.meta.to_json())))
    assert meta == result.meta
    assert ExtractionConfig.from_dict(meta.method_config) == config


def test_unregistering_forgets_the_method(toy):
    del METHODS[TOY]
    try:
        with pytest.raises(InvalidInputError, match="unknown extraction method"):
            ExtractionConfig(sites=SITES, method=TOY)
    finally:
        register(ToyConfig, toy_method)  # the fixture removes it again


# -- metadata written before the registry --------------------------------------------------


def old_metadata(**extra: object) -> dict[str, object]:
    return {
        "model_fingerprint": "fp",
        "model_name": "m",
        "sites": ["1.attn", "1.mlp"],
        "hidden_size": 32,
        "key_encoder": "enc",
        "key_dim": 8,
        "prompt_template": "generic",
        "dtype": "float32",
        "site_norms": [1.0, 2.0],
        "created_at": "2024-01-01T00:00:00+00:00",
        **extra,
    }


def test_old_metadata_with_contrast_maps_to_method():
    meta = DictionaryMeta.from_json(old_metadata(contrast="response"))
    assert meta.method == "response"


def test_old_metadata_without_method_settings_reads_as_empty_settings():
    meta = DictionaryMeta.from_json(old_metadata(contrast="context"))
    assert meta.method_config == {}
