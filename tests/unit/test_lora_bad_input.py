"""Bad adapters and bad LoRA requests: clear errors, nothing stored changed (tiny llama)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fints.adapters.files import META_FILE, WEIGHTS_FILE, AdapterError, sha256_file
from fints.adapters.storage import AdapterStore
from fints.engine import GenerationRequest, Personalizer
from fints.errors import UnknownUserError
from fints.generation import GenerationOptions
from fints.layers import resolve_layout
from fints.models import LoadedModel, model_fingerprint
from fints.store import Store
from tests.unit.benchmark_fixtures import HashEncoder, tiny_llama
from tests.unit.lora_fixtures import history, store_user_adapter, train_user, tree

OPTIONS = GenerationOptions(max_new_tokens=3)


@dataclass
class Setup:
    model: LoadedModel
    store: Store
    adapters: AdapterStore
    elsewhere: Path  # an exported adapter of alice, to import

    @property
    def files(self) -> Path:
        return self.store.path.with_name(self.store.path.name + ".files")

    def engine(self) -> Personalizer:
        return Personalizer(self.model, self.store, encoder=HashEncoder())


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    model = tiny_llama()
    store = Store(tmp_path / "store.sqlite")
    adapters = AdapterStore(store, model)
    for user in ("alice", "bob"):
        store.add_items("default", user, history(user))
    stored = store_user_adapter(adapters, "alice", train_user(model, "alice"))
    elsewhere = tmp_path / "export"
    shutil.copytree(stored.folder, elsewhere)
    yield Setup(model, store, adapters, elsewhere)
    store.close()


def other_base_model(model: LoadedModel) -> LoadedModel:
    """The same architecture and tokenizer with other weights (another fingerprint)."""
    other = tiny_llama()
    with_other_weights = other.model
    for p in with_other_weights.parameters():
        p.data.mul_(1.5)
    return LoadedModel(
        with_other_weights,
        model.tokenizer,
        "other-llama",
        model_fingerprint(with_other_weights),
        resolve_layout(with_other_weights),
    )


def test_an_adapter_of_another_base_model_is_refused_on_import(
    setup: Setup, tmp_path: Path
) -> None:
    other = other_base_model(setup.model)
    assert other.fingerprint != setup.model.fingerprint
    other_store = Store(tmp_path / "other.sqlite")
    other_store.add_items("default", "bob", history("bob"))
    foreign = store_user_adapter(AdapterStore(other_store, other), "bob", train_user(other, "bob"))
    before = tree(setup.files)
    with pytest.raises(AdapterError, match="another base model"):
        setup.adapters.import_user(foreign.folder, "default", "bob")
    assert tree(setup.files) == before
    other_store.close()


def test_a_stored_adapter_of_another_base_model_is_refused_when_used(setup: Setup) -> None:
    meta_path = setup.adapters.user_folder("default", "alice") / META_FILE
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "model_fingerprint": "0" * 64}))
    before = tree(setup.files)
    with pytest.raises(AdapterError, match="another base model"):
        setup.engine().generate([GenerationRequest("alice", "hello")], OPTIONS)
    assert tree(setup.files) == before


def test_corrupt_weights_are_refused_on_import_and_nothing_is_stored(setup: Setup) -> None:
    weights = setup.elsewhere / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-8:] = b"\xff" * 8
    weights.write_bytes(bytes(data))
    before = tree(setup.files)
    with pytest.raises(AdapterError, match="damaged"):
        setup.adapters.import_user(setup.elsewhere, "default", "bob")
    assert tree(setup.files) == before
    assert setup.adapters.user_adapter("default", "bob") is None


def test_an_unreadable_weights_file_with_a_matching_digest_is_refused(setup: Setup) -> None:
    """Digest recorded for the damaged bytes: the safetensors parser catches it."""
    weights = setup.elsewhere / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    meta_path = setup.elsewhere / META_FILE
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "weights_sha256": sha256_file(weights)}))
    before = tree(setup.files)
    with pytest.raises(AdapterError, match="damaged"):
        setup.adapters.import_user(setup.elsewhere, "default", "bob")
    assert tree(setup.files) == before


def test_a_damaged_metadata_file_is_a_clear_error(setup: Setup) -> None:
    (setup.elsewhere / META_FILE).write_text("{not json")
    with pytest.raises(AdapterError, match="damaged"):
        setup.adapters.import_user(setup.elsewhere, "default", "bob")
    (setup.elsewhere / META_FILE).unlink()
    with pytest.raises(AdapterError, match="not a fints adapter"):
        setup.adapters.import_user(setup.elsewhere, "default", "bob")


def test_a_stored_adapter_damaged_later_fails_the_request_clearly(setup: Setup) -> None:
    weights = setup.adapters.user_folder("default", "alice") / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x01")
    before = tree(setup.files)
    with pytest.raises(AdapterError, match="damaged"):
        setup.engine().generate([GenerationRequest("alice", "hello")], OPTIONS)
    assert tree(setup.files) == before


def test_asking_for_the_adapter_of_a_user_who_has_none(setup: Setup) -> None:
    engine = setup.engine()
    with pytest.raises(AdapterError, match="has no LoRA adapter"):
        engine.generate([GenerationRequest("bob", "hello", adapter=True)], OPTIONS)
    with pytest.raises(UnknownUserError):
        engine.generate([GenerationRequest("nobody", "hello", adapter=True)], OPTIONS)
    # without asking, bob is served by the base model, and says so
    (result,) = engine.generate([GenerationRequest("bob", "hello")], OPTIONS)
    assert result.adapter is None
    (result,) = engine.generate([GenerationRequest("alice", "hello", adapter=True)], OPTIONS)
    assert result.adapter == "alice"


def test_importing_for_an_unknown_user_stores_nothing(setup: Setup) -> None:
    before = tree(setup.files)
    with pytest.raises(UnknownUserError):
        setup.adapters.import_user(setup.elsewhere, "default", "carol")
    assert tree(setup.files) == before
