"""LoRA training with PEFT (tiny llama): OPPU's defaults, the loss on output tokens after
the generation prompt, standard PEFT folders that PEFT itself loads, a user adapter on top
of a task adapter, the served model untouched, and deletion with the user."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model

from fints.adapters.config import LoraTrainConfig
from fints.adapters.files import CONFIG_FILE, META_FILE, WEIGHTS_FILE, AdapterWeights, compose
from fints.adapters.host import AdapterHost
from fints.adapters.storage import AdapterStore
from fints.adapters.training import LoraTrainer, training_examples
from fints.errors import InvalidInputError
from fints.models import LoadedModel
from fints.prompts import build_prompt_ids, get_template
from fints.store import Store
from fints.target_nll import target_nll
from tests.unit.benchmark_fixtures import tiny_llama
from tests.unit.lora_fixtures import FAST, history, store_user_adapter, train_user


@dataclass
class Setup:
    model: LoadedModel
    store: Store
    adapters: AdapterStore


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    model = tiny_llama()
    store = Store(Path(tmp_path_factory.mktemp("lora-train")) / "store.sqlite")
    for user in ("alice", "bob"):
        store.add_items("default", user, history(user))
    yield Setup(model, store, AdapterStore(store, model))
    store.close()


def test_defaults_are_oppus_and_round_trip_through_json() -> None:
    config = LoraTrainConfig()
    assert (config.r, config.alpha, config.target_modules) == (8, 8, ("q_proj", "v_proj"))
    assert (config.epochs, config.lr) == (2, 1e-4)
    again = LoraTrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


@pytest.mark.parametrize(
    "bad",
    [
        {"r": 0},
        {"lr": 0.0},
        {"lr": float("nan")},
        {"epochs": 1.5},
        {"dropout": 1.0},
        {"target_modules": []},
        {"alpha": True},
        {"rank": 8},
    ],
)
def test_bad_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidInputError):
        LoraTrainConfig.from_dict(bad)


def test_examples_use_the_generation_prompt_and_end_with_the_end_of_turn(setup: Setup) -> None:
    tok = setup.model.tokenizer
    item = history("alice")[0]
    ((prompt, target),) = training_examples(setup.model, get_template("headline"), [item], 64)
    assert prompt == build_prompt_ids(tok, get_template("headline"), item.input)
    assert target == [*tok(item.output, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    ((_, cut),) = training_examples(setup.model, get_template("headline"), [item], 3)
    assert cut == target[:3]


def test_first_loss_is_the_base_models_nll_of_the_output_tokens(setup: Setup) -> None:
    """LoRA starts as the identity (B = 0), so the first step's loss is the base model's
    token-weighted NLL of the outputs alone, teacher-forced after the prompts."""
    examples = training_examples(setup.model, get_template("generic"), history("bob"), 12)
    losses: list[float] = []
    config = LoraTrainConfig(epochs=1, batch_size=len(examples))
    LoraTrainer(setup.model).train(examples, config, on_step=lambda _s, loss: losses.append(loss))
    nll = target_nll(setup.model, [p for p, _ in examples], [t for _, t in examples])
    counts = torch.tensor([len(t) for _, t in examples], dtype=torch.float32)
    assert losses[0] == pytest.approx(float((nll * counts).sum() / counts.sum()), rel=1e-5)


def test_training_lowers_the_loss_and_leaves_the_served_model_alone(setup: Setup) -> None:
    before = {k: v.clone() for k, v in setup.model.model.state_dict().items()}
    trained = train_user(setup.model, "alice", LoraTrainConfig(lr=5e-2, epochs=3))
    assert trained.epoch_losses[-1] < trained.epoch_losses[0]
    assert trained.steps == 3 * 1  # 4 items, batch size 4 by default
    after = setup.model.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_a_stored_adapter_is_a_standard_peft_folder_peft_loads(setup: Setup) -> None:
    stored = store_user_adapter(setup.adapters, "alice", train_user(setup.model, "alice"))
    assert {p.name for p in stored.folder.iterdir()} == {CONFIG_FILE, WEIGHTS_FILE, META_FILE}
    assert stored.folder.is_relative_to(setup.store.files_dir("default", "alice"))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(setup.model.model), str(stored.folder))
    ids = torch.tensor([setup.model.tokenizer("alice asks about topic 2")["input_ids"]])
    host = AdapterHost(setup.model)
    name = host.load(stored.folder)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        with host.routing([name]):
            ours = setup.model.model(input_ids=ids).logits
        base = setup.model.model(input_ids=ids).logits
    assert torch.allclose(ours, expected, atol=1e-5)
    assert not torch.allclose(base, expected, atol=1e-3)  # the adapter does something
    host.unload(name)


def test_a_user_adapter_on_a_task_adapter_equals_oppus_merged_model(setup: Setup) -> None:
    """OPPU: the task adapter merged into the base, the user's adapter on that. The stored
    user adapter holds both, so PEFT loads it on the plain base model."""
    task = train_user(setup.model, "bob", FAST)  # any adapter will do as the task one
    trainer = LoraTrainer(setup.model, task=task.weights)
    user = trainer.train(
        training_examples(setup.model, get_template("generic"), history("alice"), 12), FAST
    )
    both = compose(task.weights, user.weights)
    assert both.rank == 16 and both.scaling == 1.0
    merged_plus_user = get_peft_model(copy.deepcopy(trainer.work.model), user.weights.config)
    merged_plus_user.load_state_dict(
        {
            f"base_model.model.{k}".replace(".weight", ".default.weight"): v
            for k, v in user.weights.model_state().items()
        },
        strict=False,
    )
    stored = setup.adapters.save_user(
        "default",
        "bob",
        both,
        {
            "kind": "user",
            "model_fingerprint": setup.model.fingerprint,
            "model_name": setup.model.name,
            "train_config": FAST.to_dict(),
        },
    )
    plain = PeftModel.from_pretrained(copy.deepcopy(setup.model.model), str(stored.folder))
    ids = torch.tensor([setup.model.tokenizer("alice asks about topic 1")["input_ids"]])
    with torch.no_grad():
        oppu = merged_plus_user(input_ids=ids).logits
        ours = plain(input_ids=ids).logits
        task_only = trainer.work.model(input_ids=ids).logits
    assert torch.allclose(ours, oppu, atol=1e-4)
    assert not torch.allclose(task_only, oppu, atol=1e-3)  # the user part does something


def test_deleting_a_user_deletes_their_adapter_and_only_theirs(tmp_path: Path) -> None:
    model = tiny_llama()
    store = Store(tmp_path / "store.sqlite")
    adapters = AdapterStore(store, model)
    for user in ("alice", "bob"):
        store.add_items("default", user, history(user))
        store_user_adapter(adapters, user, train_user(model, user))
    alice_files = store.files_dir("default", "alice")
    assert adapters.user_adapter("default", "alice") is not None and alice_files.is_dir()
    store.delete_user("default", "alice")
    assert not alice_files.exists()
    store.add_items("default", "alice", history("alice"))  # a new alice starts with none
    assert adapters.user_adapter("default", "alice") is None
    assert adapters.user_adapter("default", "bob") is not None
    store.close()


def test_composing_adds_the_two_deltas_whatever_their_scaling(setup: Setup) -> None:
    task = train_user(setup.model, "bob", LoraTrainConfig(r=4, alpha=8, lr=5e-2))  # scaling 2
    user = train_user(setup.model, "alice", LoraTrainConfig(r=8, alpha=4, lr=5e-2))  # 0.5
    both = compose(task.weights, user.weights)
    assert (both.rank, both.scaling) == (12, 1.0)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"

    def delta(w: AdapterWeights) -> torch.Tensor:
        b, a = w.state[f"{prefix}.lora_B.weight"], w.state[f"{prefix}.lora_A.weight"]
        return w.scaling * b @ a

    expected = delta(task.weights) + delta(user.weights)
    assert torch.allclose(delta(both), expected, atol=1e-6)
    assert not torch.allclose(delta(user.weights), torch.zeros_like(expected), atol=1e-4)
