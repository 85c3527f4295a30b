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


def test_a_known_id_with_other_texts_rejects_the_whole_batch(store):
    store.add_items("t", "alice", items("a"))
    before, version = store.items("t", "alice"), store.version("t", "alice")
    changed = HistoryItem("a input 0", "another output", "a0")
    with pytest.raises(InvalidInputError, match=r"already has item.*a0.*other texts"):
        store.add_items("t", "alice", [HistoryItem("new", "new", "n1"), changed])
    assert store.items("t", "alice") == before
    assert store.version("t", "alice") == version


def test_tenants_keep_separate_items(store):
    store.add_items("t1", "bob", items("x"))
    store.add_items("t2", "bob", items("y"))
    assert {i.input for i in store.items("t1", "bob")} == {f"x input {i}" for i in range(3)}
    assert {i.input for i in store.items("t2", "bob")} == {f"y input {i}" for i in range(3)}


def test_deleting_a_user_in_one_tenant_leaves_the_other(store):
    store.add_items("t1", "bob", items("x"))
    store.add_items("t2", "bob", items("y"))
    store.delete_user("t1", "bob")
    assert not store.has_user("t1", "bob")
    assert len(store.items("t2", "bob")) == 3


def test_a_deleted_user_is_unknown(store):
    store.add_items("t1", "bob", items("x"))
    store.delete_user("t1", "bob")
    with pytest.raises(UnknownUserError):
        store.items("t1", "bob")


def test_the_negative_pool_never_reaches_another_tenant(store):
    store.add_items("t1", "carol", items("c"))
    store.add_items("t1", "dave", items("d"))
    store.add_items("t2", "bob", items("y"))
    assert store.sample_items("t2", 10, exclude_user="bob") == []
    assert {i.item_id for i in store.sample_items("t1", 10, exclude_user="dave")} == {
        "c0",
        "c1",
        "c2",
    }


def test_putting_entries_bumps_the_version(store):
    store.add_items("t", "alice", items("a"))
    v0 = store.version("t", "alice")
    store.put_entries("t", "alice", meta(), [entry("a0", 1.0)])
    assert store.version("t", "alice") > v0


def test_entries_roundtrip_with_their_texts(store):
    store.add_items("t", "alice", items("a"))
    store.put_entries("t", "alice", meta(), [entry("a0", 1.0), entry("a1", 2.0)])
    d = store.dictionary("t", "alice", "fp-a")
    assert d is not None and d.item_ids == ["a0", "a1"]
    torch.testing.assert_close(d.vectors[1], torch.full((2, HIDDEN), 2.0))
    torch.testing.assert_close(d.keys[0], entry("a0", 1.0).key)
    assert [i.output for i in d.items] == ["a output 0", "a output 1"]


def test_another_models_dictionary_is_none(store):
    store.add_items("t", "alice", items("a"))
    store.put_entries("t", "alice", meta(), [entry("a0")])
    assert store.dictionary("t", "alice", "fp-other") is None


def test_items_without_entries_are_the_ones_left_to_extract(store):
    store.add_items("t", "alice", items("a"))
    store.put_entries("t", "alice", meta(), [entry("a0"), entry("a1")])
    assert [i.item_id for i in store.items_without_entries("t", "alice", "fp-a")] == ["a2"]
    assert len(store.items_without_entries("t", "alice", "fp-other")) == 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_vectors_are_rejected_and_nothing_changes(store, bad):
    store.add_items("t", "alice", items("a"))
    store.put_entries("t", "alice", meta(), [entry("a0")])
    with pytest.raises(InvalidInputError, match="NaN or inf"):
        store.put_entries("t", "alice", meta(), [entry("a1"), entry("a2", bad)])
    assert store.dictionary("t", "alice", "fp-a").item_ids == ["a0"]


def test_entries_for_other_sites_are_rejected(store):
    store.add_items("t", "alice", items("a"))
    store.put_entries("t", "alice", meta(), [entry("a0")])
    other = meta(sites=parse_sites("3.attn+mlp"))
    bad = DictionaryEntry("a1", entry("a1").key, SteeringVector(other.sites, torch.ones(2, HIDDEN)))
    with pytest.raises(DictionaryMismatchError, match="other sites"):
        store.put_entries("t", "alice", other, [bad])
    assert store.dictionary("t", "alice", "fp-a").item_ids == ["a0"]


def test_entries_of_another_hidden_size_are_rejected(store):
    store.add_items("t", "alice", items("a"))
    store.put_entries("t", "alice", meta(), [entry("a0")])
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


def exported(store, tmp_path) -> UserDictionary:
    store.add_items("t", "alice", items("a"))
    store.put_entries("t", "alice", meta(), [entry("a0", 1.0), entry("a1", 2.0)])
    d = store.dictionary("t", "alice", "fp-a")
    d.save(tmp_path / "export")
    return d


def test_export_and_load_roundtrip(store, tmp_path):
    original = exported(store, tmp_path)
    loaded = UserDictionary.load(tmp_path / "export")
    assert loaded.meta == original.meta and loaded.item_ids == original.item_ids
    assert loaded.items == original.items
    torch.testing.assert_close(loaded.vectors, original.vectors)
    torch.testing.assert_close(loaded.keys, original.keys)


def test_an_exported_dictionary_imports_under_another_name(store, tmp_path):
    original = exported(store, tmp_path)
    store.import_dictionary("t2", UserDictionary.load(tmp_path / "export"), user="alice-copy")
    again = store.dictionary("t2", "alice-copy", "fp-a")
    assert again is not None and again.item_ids == original.item_ids
    torch.testing.assert_close(again.keys, original.keys)
    torch.testing.assert_close(again.vectors, original.vectors)


def test_importing_over_an_existing_user_is_refused(store, tmp_path):
    exported(store, tmp_path)
    loaded = UserDictionary.load(tmp_path / "export")
    store.import_dictionary("t2", loaded, user="alice-copy")
    with pytest.raises(InvalidInputError, match="already exists"):
        store.import_dictionary("t2", loaded, user="alice-copy")


def test_import_of_a_dictionary_without_texts_stores_nothing(store):
    store.add_items("t", "alice", items("a"))
    store.put_entries("t", "alice", meta(), [entry("a0", 1.0)])
    d = store.dictionary("t", "alice", "fp-a")
    d.items = []  # exported without texts
    with pytest.raises(InvalidInputError, match="no history texts"):
        store.import_dictionary("t", d, user="copy")
    assert not store.has_user("t", "copy")


def test_loading_a_corrupt_dictionary_folder_is_a_clear_error(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "dictionary.json").write_text("{not json")
    (tmp_path / "broken" / "vectors.safetensors").write_bytes(b"junk")
    with pytest.raises(InvalidInputError, match="cannot read dictionary"):
        UserDictionary.load(tmp_path / "broken")


@pytest.mark.parametrize(
    ("fingerprint", "hidden", "layers", "message"),
    [
        ("fp-b", HIDDEN, 4, "not from the loaded model"),
        ("fp-a", 16, 4, "hidden size"),
        ("fp-a", HIDDEN, 2, "out of range"),
    ],
)
def test_meta_check_model_names_the_mismatch(fingerprint, hidden, layers, message):
    with pytest.raises(DictionaryMismatchError, match=message):
        meta().check_model(fingerprint, hidden, layers)


def test_meta_check_model_accepts_its_own_model():
    meta().check_model("fp-a", HIDDEN, 3)  # raises nothing


def test_failed_transaction_rolls_back(store):
    store.add_items("t", "alice", items("a"))
    with pytest.raises(sqlite3.IntegrityError), store.transaction() as db:
        db.execute("INSERT INTO items VALUES ('t', 'alice', 'z', 9, 'i', 'o', 'now')")
        db.execute("INSERT INTO items VALUES ('t', 'alice', 'z', 9, 'i', 'o', 'now')")
    assert len(store.items("t", "alice")) == 3


@pytest.fixture
def three_users(store):
    for prefix, user in (("a", "alice"), ("b", "bob"), ("c", "carol")):
        store.add_items("t", user, items(prefix, 5))
    return store


def test_the_negative_pool_is_seeded(three_users):
    first = three_users.sample_items("t", 6, seed=3, exclude_user="alice")
    assert first == three_users.sample_items("t", 6, seed=3, exclude_user="alice")
    assert three_users.sample_items("t", 6, seed=4, exclude_user="alice") != first


def test_the_negative_pool_never_holds_the_users_own_items(three_users):
    pool = three_users.sample_items("t", 6, seed=3, exclude_user="alice")
    assert len(pool) == 6 and not any(i.item_id.startswith("a") for i in pool)


def test_the_negative_pool_is_at_most_every_other_item(three_users):
    assert len(three_users.sample_items("t", 100, exclude_user="alice")) == 10


def test_site_norms_cover_every_entry_after_later_builds(store):
    store.add_items("t", "u", items("a", 4))
    store.put_entries("t", "u", meta(site_norms=(2.0, 4.0)), [entry("a0"), entry("a1")])
    store.put_entries("t", "u", meta(site_norms=(8.0, 10.0)), [entry("a2"), entry("a3")])
    merged = store.dictionary("t", "u", "fp-a")
    assert merged is not None
    assert merged.meta.site_norms == (5.0, 7.0)  # two entries each: the mean of the means


def test_site_norms_of_a_rebuild_replace_the_old_ones(store):
    store.add_items("t", "u", items("a", 2))
    store.put_entries("t", "u", meta(site_norms=(2.0, 4.0)), [entry("a0"), entry("a1")])
    store.put_entries("t", "u", meta(site_norms=(6.0, 6.0)), [entry("a0"), entry("a1")])
    rebuilt = store.dictionary("t", "u", "fp-a")
    assert rebuilt is not None and rebuilt.meta.site_norms == (6.0, 6.0)
