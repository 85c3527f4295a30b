"""Faults (issue 25): a read-only store or a full disk refuses writes with a clear error
while reads and generation keep working; a damaged vector blob fails its checksum and is
reported, never used."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from fints.engine import Personalizer
from fints.errors import CorruptDataError, StoreUnavailableError
from fints.history import HistoryItem
from fints.models import LoadedModel
from fints.serving.app import ServerConfig, create_app
from fints.serving.inprocess import RunningServer
from fints.serving.payloads import Limits
from fints.store import Store
from tests.unit.benchmark_fixtures import HashEncoder, tiny_llama
from tests.unit.test_hardening_serving import user_dictionary

CONFIG = ServerConfig(
    limits=Limits(max_tokens=4, default_max_tokens=2, max_prompt_tokens=128),
    extract_on_write=False,
    max_wait_ms=0,
)
TENANT = "default"


@pytest.fixture(scope="module")
def model() -> Iterator[LoadedModel]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_llama()
    torch.set_num_threads(threads)


def filled(model: LoadedModel, path: Path) -> None:
    """A store with alice (items and a dictionary) and bob."""
    with Store(path) as store:
        p = Personalizer(model, store, encoder=HashEncoder())
        p.import_dictionary(user_dictionary(model, "alice", 4.0, 0))
        p.import_dictionary(user_dictionary(model, "bob", 4.0, 1))


def snapshot(store: Store) -> list[tuple[object, ...]]:
    return [
        row
        for table in ("users", "items", "dictionaries", "entries")
        for row in store._db.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3")
    ]


def chat(http: httpx.Client, user: str) -> httpx.Response:
    body = {"model": "tiny-llama", "user": user, "messages": [{"role": "user", "content": "hi"}]}
    return http.post("/v1/chat/completions", json=body)


def test_a_read_only_store_refuses_writes_and_serves_reads(
    model: LoadedModel, tmp_path: Path
) -> None:
    path = tmp_path / "store.sqlite"
    filled(model, path)
    with Store(path, read_only=True) as store:
        before = snapshot(store)
        with pytest.raises(StoreUnavailableError, match="read-only") as err:
            store.add_items(TENANT, "alice", [HistoryItem("new", "item")])
        assert err.value.reason == "read_only"
        with pytest.raises(StoreUnavailableError):
            store.delete_user(TENANT, "bob")
        assert snapshot(store) == before
        p = Personalizer(model, store, encoder=HashEncoder())
        app = create_app(p, CONFIG)
        with RunningServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as http:
            added = http.post(
                "/v1/users/alice/interactions", json={"items": [{"input": "a", "output": "b"}]}
            )
            assert added.status_code == 503, added.text
            error = added.json()["error"]
            assert error["code"] == "store_read_only" and "read-only" in error["message"]
            assert http.delete("/v1/users/bob").json()["error"]["code"] == "store_read_only"
            steered = chat(http, "alice")
            assert steered.status_code == 200 and steered.json()["fints"]["steered"]
            assert chat(http, "nobody").status_code == 200  # unsteered
            assert len(http.get("/v1/users/alice/interactions").json()["data"]) == 2
        assert snapshot(store) == before


def test_a_store_that_becomes_read_only_or_full_refuses_writes_cleanly(
    model: LoadedModel, tmp_path: Path
) -> None:
    path = tmp_path / "store.sqlite"
    filled(model, path)
    with Store(path) as store:
        before = snapshot(store)
        store._db.execute("PRAGMA query_only=1")  # as if the file system went read-only
        with pytest.raises(StoreUnavailableError) as err:
            store.add_items(TENANT, "carol", [HistoryItem("x", "y")])
        assert err.value.reason == "read_only"
        store._db.execute("PRAGMA query_only=0")
        (pages,) = store._db.execute("PRAGMA page_count").fetchone()
        store._db.execute(f"PRAGMA max_page_count={pages}")  # as if the disk were full
        with pytest.raises(StoreUnavailableError, match="full") as err:
            store.add_items(TENANT, "carol", [HistoryItem("x" * 19_000, "y" * 19_000)])
        assert err.value.reason == "full"
        assert snapshot(store) == before
        store._db.execute(f"PRAGMA max_page_count={10**9}")
        store.add_items(TENANT, "carol", [HistoryItem("x", "y")])  # and writes again
        assert store.integrity_check() == []


def damage_a_vector_blob(path: Path, user: str) -> None:
    """Flip one byte of one of ``user``'s vector blobs in the database file itself."""
    with Store(path) as store:
        (blob,) = store._db.execute(
            "SELECT vectors FROM entries WHERE user = ? LIMIT 1", (user,)
        ).fetchone()
        store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    at = data.find(blob)
    assert at >= 0 and data.find(blob, at + 1) < 0
    data[at + len(blob) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_damaged_vector_blob_is_reported_and_never_used(
    model: LoadedModel, tmp_path: Path
) -> None:
    path = tmp_path / "store.sqlite"
    filled(model, path)
    damage_a_vector_blob(path, "alice")
    with Store(path) as store:
        assert store._db.execute("PRAGMA integrity_check").fetchone() == ("ok",)  # SQLite: fine
        problems = store.integrity_check()
        assert len(problems) == 1 and "checksum" in problems[0] and "alice" in problems[0]
        with pytest.raises(CorruptDataError, match="alice"):
            store.dictionary(TENANT, "alice", model.fingerprint)
        assert store.dictionary(TENANT, "bob", model.fingerprint) is not None
        p = Personalizer(model, store, encoder=HashEncoder())
        app = create_app(p, CONFIG)
        with RunningServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as http:
            refused = chat(http, "alice")
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "store_corrupt"
            assert chat(http, "bob").json()["fints"]["steered"]  # others unaffected


def test_a_store_written_before_checksums_is_given_the_column(
    model: LoadedModel, tmp_path: Path
) -> None:
    path = tmp_path / "store.sqlite"
    filled(model, path)
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE entries DROP COLUMN checksum")
    db.commit()
    db.close()
    with Store(path) as store:
        columns = [r[1] for r in store._db.execute("PRAGMA table_info(entries)")]
        assert columns[-1] == "checksum"
        assert store.dictionary(TENANT, "alice", model.fingerprint) is not None  # not checked
        assert store.integrity_check() == []
        p = Personalizer(model, store, encoder=HashEncoder())
        p.import_dictionary(user_dictionary(model, "carol", 1.0, 2))
        (checksum,) = store._db.execute(
            "SELECT checksum FROM entries WHERE user = 'carol' LIMIT 1"
        ).fetchone()
        assert isinstance(checksum, str) and len(checksum) == 32
