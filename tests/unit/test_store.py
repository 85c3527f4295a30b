import sqlite3

import pytest
import torch

from fints.dictionary import DictionaryEntry, DictionaryMeta, UserDictionary
from fints.errors import DictionaryMismatchError, InvalidInputError, UnknownUserError
from fints.history import HistoryItem
from fints.sites import parse_sites
from fints.steering import SteeringVector
from fints.store import Store

SITES = parse_sites("2.attn+mlp")
HIDDEN, KEY = 8, 4


def meta(fingerprint: str = "fp-a", **changes) -> DictionaryMeta:
    fields = dict(
        model_fingerprint=fingerprint,
        model_name="tiny",
        sites=SITES,
        hidden_size=HIDDEN,
        key_encoder="enc",
        key_dim=KEY,
        prompt_template="generic",
        dtype="float32",
        site_norms=(3.0, 4.0),
    )
    fields.update(changes)
    return DictionaryMeta(**fields)


def entry(item_id: str, value: float = 1.0) -> DictionaryEntry:
    key = torch.nn.functional.normalize(torch.arange(KEY, dtype=torch.float32) + value, dim=0)
    return DictionaryEntry(item_id, key, SteeringVector(SITES, torch.full((2, HIDDEN), value)))


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "s.sqlite") as s:
        yield s


def items(prefix: str, n: int = 3) -> list[HistoryItem]:
    return [
        HistoryItem(f"{prefix} input {i}", f"{prefix} output {i}", f"{prefix}{i}") for i in range(n)
    ]


def test_add_and_read_items_in_order(store):
    store.add_items("t", "alice", items("a"))
    store.add_items("t", "alice", items("b", 2))
    assert [i.item_id for i in store.items("t", "alice")] == ["a0", "a1", "a2", "b0", "b1"]


def test_duplicate_id_rejects_the_whole_batch(store):
    store.add_items("t", "alice", items("a"))
    before = store.items("t", "alice")
    with pytest.raises(InvalidInputError, match="already has item"):
        store.add_items("t", "alice", [HistoryItem("new", "new", "n1"), *items("a", 1)])
    assert store.items("t", "alice") == before


def test_tenants_are_isolated(store):
    store.add_items("t1", "bob", items("x"))
    store.add_items("t2", "bob", items("y"))
    assert {i.input for i in store.items("t1", "bob")} == {f"x input {i}" for i in range(3)}
    store.delete_user("t1", "bob")
    assert not store.has_user("t1", "bob")
    assert len(store.items("t2", "bob")) == 3
    with pytest.raises(UnknownUserError):
        store.items("t1", "bob")
    assert store.other_users_items("t2", "bob", 10) == []


def test_entries_roundtrip_and_version_bumps(store):
    store.add_items("t", "alice", items("a"))
    v0 = store.version("t", "alice")
    store.put_entries("t", "alice", meta(), [entry("a0", 1.0), entry("a1", 2.0)])
    assert store.version("t", "alice") > v0
    d = store.dictionary("t", "alice", "fp-a")
    assert d is not None and d.item_ids == ["a0", "a1"]
    torch.testing.assert_close(d.vectors[1], torch.full((2, HIDDEN), 2.0))
    assert [i.output for i in d.items] == ["a output 0", "a output 1"]
    assert store.dictionary("t", "alice", "fp-other") is None
    assert [i.item_id for i in store.items_without_entries("t", "alice", "fp-a")] == ["a2"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_vectors_are_rejected_and_nothing_changes(store, bad):
    store.add_items("t", "alice", items("a"))
    store.put_entries("t", "alice", meta(), [entry("a0")])
    with pytest.raises(InvalidInputError, match="NaN or inf"):
        store.put_entries("t", "alice", meta(), [entry("a1"), entry("a2", bad)])
    assert store.dictionary("t", "alice", "fp-a").item_ids == ["a0"]


def test_entries_for_another_space_are_rejected(store):
    store.add_items("t", "alice", items("a"))
    store.put_entries("t", "alice", meta(), [entry("a0")])
    other = meta(sites=parse_sites("3.attn+mlp"))
    bad = DictionaryEntry("a1", entry("a1").key, SteeringVector(other.sites, torch.ones(2, HIDDEN)))
    with pytest.raises(DictionaryMismatchError, match="other sites"):
        store.put_entries("t", "alice", other, [bad])
    with pytest.raises(InvalidInputError, match="expected"):
        store.put_entries("t", "alice", meta(hidden_size=9), [entry("a1")])
    assert store.dictionary("t", "alice", "fp-a").item_ids == ["a0"]


def test_delete_leaves_no_trace_in_the_file(store, tmp_path):
    secret = "the-secret-history-of-alice-42"
    store.add_items("t", "alice", [HistoryItem(secret, secret + " out", "s1"), *items("a")])
    store.put_entries("t", "alice", meta(), [entry("s1", 7.25)])
    store.add_items("t", "carol", items("c"))
    store.delete_user("t", "alice")
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("s.sqlite"))
    assert secret.encode() not in raw
    assert b"alice" not in raw
    assert torch.full((2, HIDDEN), 7.25).numpy().tobytes() not in raw
    assert store.integrity_check() == []
    assert store.users("t") == ["carol"]


def test_export_import_roundtrip(store, tmp_path):
    store.add_items("t", "alice", items("a"))
    store.put_entries("t", "alice", meta(), [entry("a0", 1.0), entry("a1", 2.0)])
    exported = store.dictionary("t", "alice", "fp-a")
    exported.save(tmp_path / "export")
    loaded = UserDictionary.load(tmp_path / "export")
    assert loaded.meta == exported.meta and loaded.item_ids == exported.item_ids
    torch.testing.assert_close(loaded.vectors, exported.vectors)
    store.import_dictionary("t2", loaded, user="alice-copy")
    again = store.dictionary("t2", "alice-copy", "fp-a")
    torch.testing.assert_close(again.keys, exported.keys)
    with pytest.raises(InvalidInputError, match="already exists"):
        store.import_dictionary("t2", loaded, user="alice-copy")


def test_import_of_a_corrupt_dictionary_stores_nothing(store, tmp_path):
    store.add_items("t", "alice", items("a"))
    store.put_entries("t", "alice", meta(), [entry("a0", 1.0)])
    d = store.dictionary("t", "alice", "fp-a")
    d.items = []  # exported without texts
    with pytest.raises(InvalidInputError, match="no history texts"):
        store.import_dictionary("t", d, user="copy")
    assert not store.has_user("t", "copy")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "dictionary.json").write_text("{not json")
    (tmp_path / "broken" / "vectors.safetensors").write_bytes(b"junk")
    with pytest.raises(InvalidInputError, match="cannot read dictionary"):
        UserDictionary.load(tmp_path / "broken")


def test_meta_check_model_names_the_mismatch():
    m = meta()
    with pytest.raises(DictionaryMismatchError, match="not from the loaded model"):
        m.check_model("fp-b", HIDDEN, 4)
    with pytest.raises(DictionaryMismatchError, match="hidden size"):
        m.check_model("fp-a", 16, 4)
    with pytest.raises(DictionaryMismatchError, match="out of range"):
        m.check_model("fp-a", HIDDEN, 2)


def test_failed_transaction_rolls_back(store):
    store.add_items("t", "alice", items("a"))
    with pytest.raises(sqlite3.IntegrityError), store.transaction() as db:
        db.execute("INSERT INTO items VALUES ('t', 'alice', 'z', 9, 'i', 'o', 'now')")
        db.execute("INSERT INTO items VALUES ('t', 'alice', 'z', 9, 'i', 'o', 'now')")
    assert len(store.items("t", "alice")) == 3


def test_negative_pool_is_seeded_and_never_the_user(store):
    store.add_items("t", "alice", items("a", 5))
    store.add_items("t", "bob", items("b", 5))
    store.add_items("t", "carol", items("c", 5))
    first = store.other_users_items("t", "alice", 6, seed=3)
    assert first == store.other_users_items("t", "alice", 6, seed=3)
    assert len(first) == 6 and not any(i.item_id.startswith("a") for i in first)
    assert len(store.other_users_items("t", "alice", 100)) == 10
    assert store.other_users_items("t", "alice", 6, seed=4) != first
