"""Hardening of what is stored and exported: idempotent item writes, text that is not
valid Unicode, exported files readable by their owner only, and malformed imports."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fints.cli import app
from fints.dictionary import META_FILE, TENSORS_FILE, DictionaryMeta, UserDictionary
from fints.errors import InvalidInputError
from fints.history import HistoryItem, parse_history_lines
from fints.sites import parse_sites
from fints.store import Store, check_name

SITES = parse_sites("1.attn+mlp")


def items(prefix: str, n: int = 3) -> list[HistoryItem]:
    return [HistoryItem(f"{prefix} in {i}", f"{prefix} out {i}", f"{prefix}{i}") for i in range(n)]


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "s.sqlite") as s:
        yield s


# -- idempotent item writes -----------------------------------------------------------------


def test_rewriting_the_same_items_is_a_successful_no_op(store: Store) -> None:
    assert store.add_items("t", "alice", items("a")) == ["a0", "a1", "a2"]
    before, version = store.items("t", "alice"), store.version("t", "alice")
    assert store.add_items("t", "alice", items("a")) == ["a0", "a1", "a2"]  # a retry
    assert store.items("t", "alice") == before
    assert store.version("t", "alice") == version  # nothing changed, not even the version


def test_a_retry_with_new_items_stores_only_the_new_ones_in_order(store: Store) -> None:
    store.add_items("t", "alice", items("a", 2))
    assert store.add_items("t", "alice", items("a", 4)) == ["a0", "a1", "a2", "a3"]
    assert [i.item_id for i in store.items("t", "alice")] == ["a0", "a1", "a2", "a3"]


def test_items_without_ids_are_idempotent_by_their_texts(store: Store) -> None:
    item = HistoryItem("same input", "same output")
    store.add_items("t", "bob", [item])
    store.add_items("t", "bob", [HistoryItem("same input", "same output")])
    assert store.items("t", "bob") == [item]


def test_the_same_id_with_other_texts_is_refused_and_changes_nothing(store: Store) -> None:
    store.add_items("t", "alice", items("a"))
    before, version = store.items("t", "alice"), store.version("t", "alice")
    with pytest.raises(InvalidInputError, match="other texts"):
        store.add_items("t", "alice", [HistoryItem("a in 1", "edited", "a1")])
    assert store.items("t", "alice") == before
    assert store.version("t", "alice") == version


# -- text that is not valid Unicode -----------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        (("\ud800 x", "out", "i"), "'input'"),
        (("in", "x\udfff", "i"), "'output'"),
        (("in", "out", "id\ud800"), "id"),
    ],
)
def test_a_lone_surrogate_in_an_item_is_refused(fields: tuple[str, str, str], named: str) -> None:
    with pytest.raises(InvalidInputError, match=f"{named} has a lone UTF-16 surrogate"):
        HistoryItem(*fields)


def test_a_lone_surrogate_in_a_history_file_is_reported_not_a_crash() -> None:
    with pytest.raises(InvalidInputError, match=r"<input>:1: .*surrogate"):
        parse_history_lines(['{"input": "\\ud800", "output": "b"}'])


def test_a_lone_surrogate_in_a_user_name_is_refused(store: Store) -> None:
    with pytest.raises(InvalidInputError, match="surrogate"):
        check_name("user", "bob\ud800")
    with pytest.raises(InvalidInputError, match="surrogate"):
        store.add_items("t", "bob\ud800", items("a"))
    assert store.users("t") == []


def test_a_long_blank_name_is_not_echoed_whole() -> None:
    with pytest.raises(InvalidInputError) as err:
        check_name("user", " " * 100_000)
    assert len(str(err.value)) < 200


# -- export and import ----------------------------------------------------------------------


def dictionary(n: int = 2) -> UserDictionary:
    meta = DictionaryMeta("fp", "tiny", SITES, 8, "enc", 4, "generic", "float32", site_norms=(1, 1))
    history = items("d", n)
    return UserDictionary(
        "dora",
        meta,
        [i.item_id for i in history],
        torch.nn.functional.normalize(torch.rand(n, 4), dim=1),
        torch.rand(n, len(SITES), 8),
        history,
    )


def test_export_writes_both_files_for_their_owner_only(tmp_path: Path) -> None:
    folder = dictionary().save(tmp_path / "out")
    for name in (META_FILE, TENSORS_FILE):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name


def test_export_over_a_readable_file_makes_it_private(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / META_FILE).write_text("{}")
    (folder / META_FILE).chmod(0o644)
    dictionary().save(folder)
    assert stat.S_IMODE((folder / META_FILE).stat().st_mode) == 0o600
    assert UserDictionary.load(folder).item_ids == ["d0", "d1"]


def broken(tmp_path: Path, change) -> Path:
    folder = dictionary().save(tmp_path / "broken")
    payload = json.loads((folder / META_FILE).read_text())
    change(payload)
    (folder / META_FILE).write_text(json.dumps(payload))
    return folder


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda p: p.pop("user"), "missing field 'user'"),
        (lambda p: p.pop("meta"), "missing field 'meta'"),
        (lambda p: p.pop("item_ids"), "missing field 'item_ids'"),
        (lambda p: p["items"][1].pop("output"), r"items\[1\]: missing field 'output'"),
        (lambda p: p["items"][0].update(id=7), "field 'id' must be a string"),
        (lambda p: p["meta"].pop("sites"), "missing field 'sites'"),
        (lambda p: p["meta"].update(site_norms=["x", "y"]), "malformed"),
        (lambda p: p.update(items="nope"), "'items' must be a list"),
        (lambda p: p.update(user=["x"]), "field 'user' must be a string"),
    ],
)
def test_a_malformed_dictionary_json_is_a_clear_error(tmp_path: Path, change, says: str) -> None:
    with pytest.raises(InvalidInputError, match=says):
        UserDictionary.load(broken(tmp_path, change))


def test_a_dictionary_json_that_is_not_an_object_is_a_clear_error(tmp_path: Path) -> None:
    folder = dictionary().save(tmp_path / "d")
    (folder / META_FILE).write_text("[1, 2]")
    with pytest.raises(InvalidInputError, match="must hold a JSON object"):
        UserDictionary.load(folder)


def test_fints_import_of_a_dictionary_missing_a_field_prints_one_error_line(
    tmp_path: Path,
) -> None:
    folder = broken(tmp_path, lambda p: p.pop("user"))
    result = CliRunner().invoke(app, ["import", str(folder), "--store", str(tmp_path / "s.db")])
    assert result.exit_code == 1
    assert "error:" in result.output and "missing field 'user'" in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an exception
