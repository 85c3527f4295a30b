"""The "trained" extraction method through the engine, on a tiny random llama: shared +
delta vectors in the dictionary, incremental updates, tenant state and deletion."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fints.engine import GenerationRequest, Personalizer
from fints.errors import InvalidInputError
from fints.extraction import METHODS, ExtractionConfig, TrainedConfig
from fints.generation import GenerationOptions
from fints.history import HistoryItem
from fints.models import LoadedModel
from fints.sites import parse_sites
from fints.store import Store
from tests.unit.benchmark_fixtures import HashEncoder, tiny_llama

SITES = parse_sites("2.block")
FAST = {"shared_steps": 3, "steps": 3, "incremental_steps": 2, "batch_size": 4}


def history(user: str, n: int) -> list[HistoryItem]:
    word = {"ann": "apples", "bob": "boats", "cy": "clouds"}[user]
    return [
        HistoryItem(f"question {i} of {user}", f"I like {word} number {i}!", f"{user}-{i}")
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return tiny_llama()


@pytest.fixture
def engine(tiny: LoadedModel, tmp_path: Path) -> Iterator[Personalizer]:
    store = Store(tmp_path / "store.sqlite")
    extraction = ExtractionConfig(sites=SITES, method="trained", params=FAST)
    yield Personalizer(tiny, store, encoder=HashEncoder(), extraction=extraction)
    store.close()


def test_trained_is_a_registered_method_with_a_json_config() -> None:
    assert METHODS["trained"].config is TrainedConfig
    config = ExtractionConfig(sites=SITES, method="trained", params={"steps": 7})
    again = ExtractionConfig.from_dict(config.to_dict())
    assert again == config and again.settings.steps == 7  # type: ignore[attr-defined]


def test_a_dictionary_records_the_method_and_holds_one_user_vector(
    engine: Personalizer,
) -> None:
    for user in ("ann", "bob"):
        engine.add_history(user, history(user, 4), build=False)
    engine.build("ann", progress=False)
    ann = engine.dictionary("ann")
    assert ann is not None and len(ann) == 4
    assert ann.meta.method == "trained"
    assert ann.meta.method_config["params"]["steps"] == FAST["steps"]
    # user-level: every entry is the same (shared + delta) vector, and it is not zero
    assert torch.allclose(ann.vectors, ann.vectors[:1].expand_as(ann.vectors))
    assert ann.vectors.norm() > 0
    assert all(n > 0 for n in ann.meta.site_norms)


def test_users_get_different_vectors(engine: Personalizer) -> None:
    for user in ("ann", "bob"):
        engine.add_history(user, history(user, 4))
    ann, bob = engine.dictionary("ann"), engine.dictionary("bob")
    assert ann is not None and bob is not None
    assert not torch.allclose(ann.vectors[0], bob.vectors[0])


def test_a_new_item_updates_every_entry_from_the_current_vector(engine: Personalizer) -> None:
    engine.add_history("ann", history("ann", 4))
    before = engine.dictionary("ann")
    assert before is not None
    engine.add_history("ann", [HistoryItem("one more", "apples again!", "ann-new")])
    after = engine.dictionary("ann")
    assert after is not None and len(after) == 5 and "ann-new" in after.item_ids
    assert not torch.allclose(after.vectors[0], before.vectors[0])
    assert torch.allclose(after.vectors, after.vectors[:1].expand_as(after.vectors))
    # an update moves the vector a little, it does not start again from zero
    moved = (after.vectors[0] - before.vectors[0]).norm()
    assert moved < before.vectors[0].norm()


def test_the_shared_vector_is_kept_per_tenant_and_dropped_when_a_user_is_deleted(
    engine: Personalizer,
) -> None:
    engine.add_history("ann", history("ann", 4))
    assert engine._method_state["default"]  # trained once for the tenant
    engine.add_history("bob", history("bob", 4), tenant="other")
    assert set(engine._method_state) == {"default", "other"}
    engine.delete_user("ann")
    assert "default" not in engine._method_state
    assert engine.store.users() == []


def test_steered_generation_uses_the_trained_vectors(engine: Personalizer) -> None:
    engine.add_history("ann", history("ann", 4))
    options = GenerationOptions(max_new_tokens=4)
    steered, plain = engine.generate(
        [GenerationRequest("ann", "question 9"), GenerationRequest(None, "question 9")], options
    )
    assert steered.steered and not plain.steered
    assert steered.retrieved  # retrieval runs over the trained entries as over any others


def test_per_item_refinement_gives_each_entry_its_own_vector(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    extraction = ExtractionConfig(
        sites=SITES, method="trained", params={**FAST, "item_steps": 2, "item_l2": 0.0}
    )
    with Store(tmp_path / "s.sqlite") as store:
        engine = Personalizer(tiny, store, encoder=HashEncoder(), extraction=extraction)
        engine.add_history("cy", history("cy", 3))
        cy = engine.dictionary("cy")
        assert cy is not None
        assert not torch.allclose(cy.vectors[0], cy.vectors[1])


@pytest.mark.parametrize(
    ("field", "value"),
    [("steps", 0), ("incremental_steps", 0), ("shared_steps", -1), ("pool", -1), ("replay", -2),
     ("item_lr", 0.0), ("shared_lr", -1.0), ("shared_patience", 0),
     ("shared_valid_fraction", 1.0)],
)  # fmt: skip
def test_bad_trained_settings_are_refused_with_their_name(field: str, value: float) -> None:
    with pytest.raises(InvalidInputError) as err:
        TrainedConfig(**{field: value})
    assert field in str(err.value) or err.value.param == field


def test_trained_targets_end_with_the_end_of_turn_token_only_when_the_output_fits(
    tiny: LoadedModel,
) -> None:
    from fints.encoders import KeyEncoder
    from fints.extraction.base import MethodContext
    from fints.extraction.trained import _examples
    from fints.prompts import TEMPLATES

    encoder: KeyEncoder = HashEncoder()
    context = MethodContext(tiny, encoder, TEMPLATES["generic"], SITES, 4, 40, 0)
    eos = tiny.tokenizer.eos_token_id
    short, long = history("ann", 1)[0], HistoryItem("q", "one two three " * 20)
    (_, short_target), (_, long_target) = _examples(context, [short, long])
    assert short_target[-1] == eos and eos not in short_target[:-1]
    assert len(long_target) == 40 and eos not in long_target  # cut: no false end
    assert context.target_ids(short.output) == short_target[:-1]  # contrast methods: no end


def test_a_first_build_in_steps_yields_between_training_pieces_and_stores_the_same(
    tiny: LoadedModel, engine: Personalizer, tmp_path: Path
) -> None:
    """The server runs a build a step at a time and decodes between steps: the tenant's
    first trained build (its shared vector) must not be one step of minutes."""
    engine.add_history("ann", history("ann", 6), build=False)
    steps = list(engine.build_steps("ann", chunk_items=2))
    pieces = [s for s in steps if s is None]
    # 6 examples in batches of 4 = pieces of 2 + 2 and 2: every Adam step is 1-2 pieces,
    # after 3 + 2 captures for the shared and the user stage, and 3 site-norm pieces
    assert len(pieces) >= FAST["shared_steps"] + FAST["steps"] + 5 + 3
    assert [s for s in steps if s is not None][-1] is steps[-1]  # stored once, at the end
    with Store(tmp_path / "whole.sqlite") as store:
        whole = Personalizer(tiny, store, encoder=HashEncoder(), extraction=engine.extraction)
        whole.add_history("ann", history("ann", 6))
        a, b = whole.dictionary("ann"), engine.dictionary("ann")
        assert a is not None and b is not None and a.item_ids == b.item_ids
        torch.testing.assert_close(a.vectors, b.vectors, rtol=1e-4, atol=1e-5)


def test_the_shared_vector_keeps_its_best_step_on_held_out_pool_items(tiny: LoadedModel) -> None:
    """The shared vector trains on the pool but a held-out share, and keeps the step of
    that training that fits the held-out share best (step 0, no vector, included); with
    ``shared_patience=None`` it trains on the whole pool and keeps the last step."""
    from fints.encoders import KeyEncoder
    from fints.extraction.base import MethodContext
    from fints.extraction.trained import _examples, shared_vector
    from fints.prompts import TEMPLATES
    from fints.steps import run_to_end
    from fints.target_nll import target_nll
    from fints.vector_training import TrainingConfig, holdout_latest, train_vectors

    encoder: KeyEncoder = HashEncoder()
    pool = history("ann", 6) + history("bob", 6) + history("cy", 4)
    settings = {"shared_steps": 6, "shared_lr": 5.0, "batch_size": 4}

    def fresh_context() -> MethodContext:  # its own tenant state: nothing cached
        return MethodContext(tiny, encoder, TEMPLATES["generic"], SITES, 4, 16, 0)

    def shared(**extra: object) -> torch.Tensor:
        config = TrainedConfig(**settings, **extra)
        return run_to_end(shared_vector(fresh_context(), config, pool))

    def trajectory(examples: list, training: TrainingConfig) -> list[torch.Tensor]:
        steps = [torch.zeros(1, tiny.hidden_size)]
        no_stop = TrainingConfig.from_dict({**training.to_dict(), "patience": None})
        train_vectors(tiny, SITES, examples, config=no_stop,
                      on_step=lambda _, values: steps.append(values))  # fmt: skip
        return steps

    examples = _examples(fresh_context(), pool)
    config = TrainedConfig(**settings, shared_valid_fraction=0.25)
    train, valid = holdout_latest(examples, 0.25)
    prompts, targets = zip(*valid, strict=True)
    steps = trajectory(train, config.training("shared"))
    held_out = [float(target_nll(tiny, prompts, targets, {SITES[0]: v}).mean()) for v in steps]
    best = min(range(len(steps)), key=held_out.__getitem__)
    torch.testing.assert_close(shared(shared_valid_fraction=0.25), steps[best])
    every_step = trajectory(examples, config.training("shared"))
    torch.testing.assert_close(shared(shared_patience=None), every_step[-1])
    assert not torch.allclose(steps[best], every_step[-1])
