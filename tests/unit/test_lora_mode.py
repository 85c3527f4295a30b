"""The ``lora`` mode: one batch whose rows use different users' adapters and different
users' steering dictionaries, each row equal to its own unbatched run (tiny llama)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fints.adapters.host import BASE
from fints.adapters.mode import LoraAddition, LoraMode
from fints.adapters.storage import AdapterStore
from fints.engine import GenerationRequest, Personalizer
from fints.generation import GenerationOptions
from fints.models import LoadedModel
from fints.modes import MODES
from fints.steering import SteeringConfig
from fints.store import Store
from tests.unit.benchmark_fixtures import HashEncoder, tiny_llama
from tests.unit.lora_fixtures import history, store_user_adapter, train_user
from tests.unit.test_modes import imported_user

OPTIONS = GenerationOptions(max_new_tokens=6)
OFF = SteeringConfig(enabled=False)


@dataclass
class Setup:
    model: LoadedModel
    pristine: torch.nn.Module  # the model before any adapter was loaded
    store: Store

    def engine(self, **kwargs: object) -> Personalizer:
        return Personalizer(self.model, self.store, encoder=HashEncoder(), **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    model = tiny_llama()
    pristine = copy.deepcopy(model.model)
    store = Store(Path(tmp_path_factory.mktemp("lora-mode")) / "store.sqlite")
    engine = Personalizer(model, store, encoder=HashEncoder())
    adapters = AdapterStore(store, model)
    for seed, user in enumerate(("alice", "bob")):
        engine.import_dictionary(imported_user(model, user, seed))
        store_user_adapter(adapters, user, train_user(model, user))
    engine.import_dictionary(imported_user(model, "carol", 7))  # steering, no adapter
    yield Setup(model, pristine, store)
    store.close()


BATCH = [
    GenerationRequest("alice", "alice wrote about topic 2"),  # alice's adapter + steering
    GenerationRequest("bob", "bob wrote about topic 1"),  # bob's adapter + steering
    GenerationRequest(None, "a question from nobody"),  # base model
    GenerationRequest("alice", "alice wrote about topic 3", steering=OFF),  # adapter only
    GenerationRequest("bob", "bob wrote about topic 3", adapter=False),  # steering only
    GenerationRequest("carol", "carol wrote about topic 1"),  # no adapter: base + steering
    GenerationRequest("bob", "alice wrote about topic 2", steering=OFF),  # adapter only
]


def test_mode_is_registered_and_on_by_default(setup: Setup) -> None:
    assert isinstance(MODES["lora"](), LoraMode)
    assert any(isinstance(m, LoraMode) for m in setup.engine().modes)


def test_mixed_batch_rows_equal_their_unbatched_runs(setup: Setup) -> None:
    engine = setup.engine()
    batched = engine.generate(BATCH, OPTIONS)
    alone = [engine.generate([r], OPTIONS)[0] for r in BATCH]
    assert [r.text for r in batched] == [r.text for r in alone]
    assert [r.adapter for r in batched] == ["alice", "bob", None, "alice", None, None, "bob"]
    assert [r.steered for r in batched] == [True, True, False, False, True, True, False]


def test_adapters_change_what_is_written(setup: Setup) -> None:
    """Guards the test above: each user's adapter changes the text, and differently."""
    engine = setup.engine()
    query = "alice wrote about topic 2"
    texts = [
        r.text
        for r in engine.generate(
            [
                GenerationRequest("alice", query, steering=OFF),
                GenerationRequest("bob", query, steering=OFF),
                GenerationRequest("alice", query, steering=OFF, adapter=False),
            ],
            OPTIONS,
        )
    ]
    assert len(set(texts)) == 3, texts


def test_adapter_rows_prepare_per_row_names_and_select_keeps_them(setup: Setup) -> None:
    prepared = setup.engine().prepare(BATCH)
    (lora,) = [a for a in prepared.additions if isinstance(a, LoraAddition)]
    assert lora.names[2] == BASE and lora.names[0] == lora.names[3] != lora.names[1]
    part = prepared.select([1, 2])
    (chosen,) = [a for a in part.additions if isinstance(a, LoraAddition)]
    assert chosen.names == (lora.names[1], BASE)


def test_plain_forward_passes_stay_the_base_models(setup: Setup) -> None:
    setup.engine().generate(BATCH[:2], OPTIONS)  # both adapters loaded into the model
    ids = torch.tensor([setup.model.tokenizer("hello there friend")["input_ids"]])
    with torch.no_grad():
        now = setup.model.model(input_ids=ids).logits
        before = setup.pristine(input_ids=ids).logits
    assert torch.equal(now, before)


def test_no_adapter_rows_add_no_decoration(setup: Setup) -> None:
    prepared = setup.engine().prepare([GenerationRequest("carol", "hi"), BATCH[2]])
    assert not [a for a in prepared.additions if isinstance(a, LoraAddition)]


def test_a_full_host_keeps_the_adapters_of_the_batch(setup: Setup) -> None:
    """Capacity 1, two adapters in one batch: neither is evicted before it is decoded."""
    small = setup.engine(modes=("steering", LoraMode(capacity=1)))
    batched = small.generate([BATCH[0], BATCH[1]], OPTIONS)
    reference = setup.engine().generate([BATCH[0], BATCH[1]], OPTIONS)
    assert [r.text for r in batched] == [r.text for r in reference]


def test_a_deleted_users_adapter_leaves_the_model_at_the_next_batch(tmp_path: Path) -> None:
    model = tiny_llama()
    store = Store(tmp_path / "store.sqlite")
    adapters = AdapterStore(store, model)
    for user in ("alice", "bob"):
        store.add_items("default", user, history(user))
        store_user_adapter(adapters, user, train_user(model, user))
    mode = LoraMode()
    engine = Personalizer(model, store, encoder=HashEncoder(), modes=("steering", mode))
    results = engine.generate([GenerationRequest(u, "hello") for u in ("alice", "bob")], OPTIONS)
    assert [r.adapter for r in results] == ["alice", "bob"]
    host = mode.host(model)
    assert len(host.loaded()) == 2
    engine.delete_user("alice")
    (result,) = engine.generate([GenerationRequest("bob", "hello")], OPTIONS)
    assert result.adapter == "bob"
    assert host.loaded() == {adapters.require_user_adapter("default", "bob").name}
    store.close()


def test_trained_dictionaries_ride_on_adapters_in_a_mixed_batch(tmp_path: Path) -> None:
    """The plug-in with the default method's dictionaries (a tenant's shared vector plus
    each user's delta): rows with an adapter and trained vectors, an adapter alone and
    trained vectors alone, in one batch, each equal to its unbatched run."""
    model = tiny_llama()
    store = Store(tmp_path / "store.sqlite")
    adapters = AdapterStore(store, model)
    engine = Personalizer(model, store, encoder=HashEncoder())
    for user in ("dave", "erin"):
        engine.add_history(user, history(user))
        store_user_adapter(adapters, user, train_user(model, user))
    dave = engine.dictionary("dave")
    assert dave is not None and dave.meta.method == "trained"
    batch = [
        GenerationRequest("dave", "dave asks about topic 1"),
        GenerationRequest("erin", "erin asks about topic 2"),
        GenerationRequest("dave", "dave asks about topic 3", steering=OFF),
        GenerationRequest("erin", "erin asks about topic 0", adapter=False),
    ]
    batched = engine.generate(batch, OPTIONS)
    alone = [engine.generate([r], OPTIONS)[0] for r in batch]
    assert [r.text for r in batched] == [r.text for r in alone]
    assert [r.adapter for r in batched] == ["dave", "erin", "dave", None]
    assert [r.steered for r in batched] == [True, True, False, True]
    plain = engine.generate(
        [GenerationRequest("dave", "dave asks about topic 1", steering=OFF, adapter=False)], OPTIONS
    )
    assert plain[0].text != batched[0].text  # adapter and vectors change what is written
    store.close()
