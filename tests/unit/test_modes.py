"""Generation modes and backends as registries, prepared batches, steering settings as
JSON, and applying one steering vector (tiny random llama, hashing key encoder)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from transformers import LogitsProcessor

from fints.dictionary import DictionaryMeta, UserDictionary
from fints.engine import GenerationRequest, Personalizer, PreparedBatch
from fints.errors import InvalidInputError
from fints.generation import Decoration, GenerationOptions
from fints.history import HistoryItem
from fints.layers import resolve_layout
from fints.models import LoadedModel
from fints.modes import MODES, BatchRows, SteeringAddition
from fints.sites import Component, parse_sites
from fints.steering import MAX_STRENGTH, SteeringConfig, SteeringVector
from fints.store import Store
from tests.conftest import tiny_model
from tests.unit.benchmark_fixtures import HashEncoder, tiny_llama

SITES = parse_sites("1.attn+mlp")
OPTIONS = GenerationOptions(max_new_tokens=4)


def imported_user(model: LoadedModel, user: str, seed: int, n: int = 4) -> UserDictionary:
    """A dictionary of large random vectors (they visibly change what the model writes)."""
    encoder = HashEncoder()
    items = [
        HistoryItem(f"{user} wrote about topic {i}", f"{user} answer {i}", f"{user}{i}")
        for i in range(n)
    ]
    meta = DictionaryMeta(
        model.fingerprint,
        model.name,
        SITES,
        model.hidden_size,
        encoder.name,
        encoder.dim,
        "generic",
        "float32",
        site_norms=(1.0, 1.0),
    )
    g = torch.Generator().manual_seed(seed)
    vectors = 4.0 * torch.randn(n, len(SITES), model.hidden_size, generator=g)
    keys = encoder.encode([i.input for i in items])
    return UserDictionary(user, meta, [i.item_id for i in items], keys, vectors, items)


@dataclass
class Setup:
    model: LoadedModel
    store: Store

    def personalizer(self, **kwargs: Any) -> Personalizer:
        return Personalizer(self.model, self.store, encoder=HashEncoder(), **kwargs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    model = tiny_llama()
    store = Store(Path(tmp_path_factory.mktemp("modes")) / "store.sqlite")
    engine = Personalizer(model, store, encoder=HashEncoder())
    for seed, user in enumerate(("alice", "bob")):
        engine.import_dictionary(imported_user(model, user, seed))
    yield Setup(model, store)
    store.close()


REQUESTS = [
    GenerationRequest("alice", "alice wrote about topic 2", stop=("zz",)),
    GenerationRequest(None, "a question from nobody"),
    GenerationRequest("bob", "bob wrote about topic 1", stop=("yy", "xx")),
    GenerationRequest("alice", "topic 3", steering=SteeringConfig(enabled=False)),
    GenerationRequest("bob", "bob wrote about topic 3", stop=("ww",)),
]


# -- PreparedBatch.select ---------------------------------------------------------------


def test_select_keeps_prompts_results_and_stops_aligned(setup: Setup) -> None:
    full = setup.personalizer().prepare(REQUESTS)
    part = full.select([4, 0, 1])
    assert part.prompts == [full.prompts[i] for i in (4, 0, 1)]
    assert [r.user for r in part.results] == ["bob", "alice", None]
    assert all(part.results[n] is full.results[i] for n, i in enumerate((4, 0, 1)))
    assert part.stops == [("ww",), ("zz",), ()]


def test_select_keeps_each_rows_vectors_and_retrieval(setup: Setup) -> None:
    full = setup.personalizer().prepare(REQUESTS)
    part = full.select([4, 0, 1])
    (whole,), (chosen,) = full.additions, part.additions
    assert isinstance(whole, SteeringAddition) and isinstance(chosen, SteeringAddition)
    for site, values in whole.vectors.items():
        assert torch.equal(chosen.vectors[site], values[[4, 0, 1]])
    assert chosen.retrieved == (whole.retrieved[4], whole.retrieved[0], ())
    assert chosen.weights == (whole.weights[4], whole.weights[0], ())


def test_a_selected_batch_decodes_as_those_rows_prepared_alone(setup: Setup) -> None:
    engine = setup.personalizer()
    part = engine.prepare(REQUESTS).select([4, 1, 0])
    alone = engine.prepare([REQUESTS[4], REQUESTS[1], REQUESTS[0]])
    texts = [r.text for r in engine.decode(part, OPTIONS)]
    assert texts == [r.text for r in engine.decode(alone, OPTIONS)]


def test_steered_rows_decode_differently_from_unsteered_ones(setup: Setup) -> None:
    """Guards the test above: the vectors are strong enough to change the text."""
    engine = setup.personalizer()
    steered = engine.generate([REQUESTS[0]], OPTIONS)[0]
    plain = engine.generate(
        [GenerationRequest("alice", REQUESTS[0].query, steering=SteeringConfig(enabled=False))],
        OPTIONS,
    )[0]
    assert steered.steered and not plain.steered
    assert steered.text != plain.text


# -- a new generation mode ----------------------------------------------------------------

TOY_MODE = "force-one-token-test"


class ForceToken(LogitsProcessor):
    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.token] = 0.0
        return forced  # type: ignore[return-value]


@dataclass(frozen=True)
class ForceAddition:
    token: int

    def select(self, rows: Sequence[int]) -> ForceAddition:
        return self

    def decoration(self, model: LoadedModel) -> Decoration:
        return Decoration(logits_processors=(ForceToken(self.token),))

    def annotate(self, results: Sequence[Any]) -> None:
        for result in results:
            result.note = f"{result.note} forced".strip()


class ForceMode:
    name: ClassVar[str] = TOY_MODE
    token: ClassVar[int] = 0  # set by the fixture from the tokenizer

    def prepare(self, rows: BatchRows) -> ForceAddition:
        return ForceAddition(self.token)


@pytest.fixture
def force_mode(setup: Setup) -> Iterator[int]:
    token = setup.model.tokenizer(" hello", add_special_tokens=False)["input_ids"][0]
    ForceMode.token = token
    MODES[TOY_MODE] = ForceMode
    try:
        yield token
    finally:
        del MODES[TOY_MODE]


def test_a_registered_mode_changes_what_the_backend_decodes(setup: Setup, force_mode: int) -> None:
    engine = setup.personalizer(modes=("steering", TOY_MODE))
    prepared = engine.prepare(REQUESTS[:3])
    engine.decode(prepared, OPTIONS)
    assert all(r.completion_tokens == OPTIONS.max_new_tokens for r in prepared.results)
    token_text = str(setup.model.tokenizer.decode([force_mode])).strip()
    assert [r.text.split() for r in prepared.results] == [[token_text] * 4] * 3


def test_without_the_mode_the_same_rows_decode_other_text(setup: Setup, force_mode: int) -> None:
    """Guards the test above: the forced text is not what the model writes anyway."""
    token_text = str(setup.model.tokenizer.decode([force_mode])).strip()
    results = setup.personalizer().generate(REQUESTS[:3], OPTIONS)
    assert all(r.text.split() != [token_text] * 4 for r in results)


def test_a_registered_mode_annotates_the_results(setup: Setup, force_mode: int) -> None:
    prepared = setup.personalizer(modes=(TOY_MODE,)).prepare(REQUESTS[:2])
    assert [r.note for r in prepared.results] == ["forced", "no user given forced"]


@pytest.mark.parametrize(
    ("kwargs", "named"), [({"modes": ("nope",)}, "nope"), ({"backend": "vllm-x"}, "vllm-x")]
)
def test_an_unknown_mode_or_backend_is_named(setup: Setup, kwargs: dict, named: str) -> None:
    with pytest.raises(InvalidInputError, match=f"unknown generation mode or backend.*{named}"):
        setup.personalizer(**kwargs)


def test_prepared_batch_select_of_no_rows_is_empty() -> None:
    batch = PreparedBatch([[1, 2]], [], [()], [])
    assert batch.select([]).prompts == []


# -- SteeringConfig as JSON ---------------------------------------------------------------

FULL = SteeringConfig(
    sites=parse_sites("1.attn,2.mlp"),
    strengths={"attn": 0.3, "mlp": -1.5, "block": 0.0},
    relative=True,
    top_k=3,
    aggregation="mean",
    tau=0.5,
    icl_k=2,
    enabled=False,
)


def test_steering_config_round_trips_through_json() -> None:
    data = json.loads(json.dumps(FULL.to_dict()))
    assert SteeringConfig.from_dict(data) == FULL


def test_settings_left_out_or_none_keep_the_bases() -> None:
    assert SteeringConfig.from_dict({"top_k": 7, "tau": None}, base=FULL) == FULL.with_(top_k=7)


def test_given_strengths_update_the_bases_per_component() -> None:
    config = SteeringConfig.from_dict({"strengths": {"mlp": 2.0}}, base=FULL)
    assert dict(config.strengths) == {"attn": 0.3, "mlp": 2.0, "block": 0.0}


def test_the_largest_strength_is_accepted() -> None:
    config = SteeringConfig.from_dict({"strengths": {"attn": -MAX_STRENGTH}})
    assert config.strengths[Component.ATTN] == -MAX_STRENGTH


@pytest.mark.parametrize(
    ("data", "param"),
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": "3"}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"strengths": "strong"}, "strengths"),
        ({"strengths": {"ffn": 1.0}}, "strengths"),
        ({"strengths": {"attn": "1"}}, "strengths"),
        ({"strengths": {"mlp": MAX_STRENGTH * 1.01}}, "strengths"),
        ({"strengths": {"mlp": float("inf")}}, "strengths"),
        ({"sites": "1.ffn"}, "sites"),
        ({"sites": ""}, "sites"),
        ({"aggregation": "max"}, "aggregation"),
        ({"tau": 0}, "tau"),
        ({"icl_k": -1}, "icl_k"),
        ({"relative": "yes"}, "relative"),
        ({"shiny": 1}, "shiny"),
    ],
)
def test_steering_config_errors_name_the_field(data: dict, param: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        SteeringConfig.from_dict(data)
    assert err.value.param == param


@pytest.mark.parametrize("sites", [5, ["1.attn", 3]])
def test_sites_of_the_wrong_type_are_named(sites: object) -> None:
    with pytest.raises(InvalidInputError) as err:
        SteeringConfig.from_dict({"sites": sites})
    assert err.value.param == "sites"


def test_steering_settings_must_be_an_object() -> None:
    with pytest.raises(InvalidInputError, match="must be an object"):
        SteeringConfig.from_dict([("top_k", 3)])  # type: ignore[arg-type]


# -- SteeringVector.apply -----------------------------------------------------------------


@pytest.fixture(scope="module")
def small() -> torch.nn.Module:
    return tiny_model("llama")


IDS = torch.tensor([[1, 5, 7, 9]])


def add_by_hand(vector: torch.Tensor) -> Any:
    def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (output[0] + vector, *output[1:])
        return output + vector

    return hook


def test_apply_adds_strength_times_the_vector_at_its_sites(small: torch.nn.Module) -> None:
    layout = resolve_layout(small)
    values = torch.randn(len(SITES), 32, generator=torch.Generator().manual_seed(0))
    with SteeringVector(SITES, values).apply(layout, strength=2.0):
        applied = small(IDS).logits
    handles = [
        layout.module(site).register_forward_hook(add_by_hand(2.0 * values[n]))
        for n, site in enumerate(SITES)
    ]
    try:
        by_hand = small(IDS).logits
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(applied, by_hand)
    assert not torch.allclose(applied, small(IDS).logits)


def test_apply_removes_its_hooks_on_exit(small: torch.nn.Module) -> None:
    layout = resolve_layout(small)
    plain = small(IDS).logits
    with SteeringVector(SITES, torch.ones(len(SITES), 32)).apply(layout):
        assert not torch.allclose(small(IDS).logits, plain)
    assert torch.equal(small(IDS).logits, plain)
    assert all(not m._forward_hooks for m in small.modules())


def test_apply_removes_its_hooks_when_the_body_raises(small: torch.nn.Module) -> None:
    layout = resolve_layout(small)
    plain = small(IDS).logits
    vector = SteeringVector(SITES, torch.ones(len(SITES), 32))
    with pytest.raises(RuntimeError, match="boom"), vector.apply(layout):
        raise RuntimeError("boom")
    assert torch.equal(small(IDS).logits, plain)
    assert all(not m._forward_hooks for m in small.modules())


def test_apply_steers_every_row_of_a_batch(small: torch.nn.Module) -> None:
    layout = resolve_layout(small)
    batch = torch.tensor([[1, 5, 7, 9], [1, 6, 6, 3]])
    plain = small(batch).logits
    with SteeringVector(SITES, torch.ones(len(SITES), 32)).apply(layout):
        steered = small(batch).logits
    assert not torch.allclose(steered[0], plain[0]) and not torch.allclose(steered[1], plain[1])
