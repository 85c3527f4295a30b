"""Privacy (issue 25): deleting a user and expiring old items remove their texts, names,
keys and vectors from the bytes of the SQLite file and its WAL (written data still only in
the WAL, and checkpointed into the main file); expiry is optional and configurable."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import torch

from fints.dictionary import DictionaryEntry, DictionaryMeta
from fints.engine import Personalizer
from fints.errors import InvalidInputError
from fints.history import HistoryItem
from fints.serving.app import ServerConfig, create_app
from fints.serving.inprocess import RunningServer
from fints.sites import parse_sites
from fints.steering import SteeringVector
from fints.store import Store
from fints.store_expiry import expire_items
from fints.store_schema import tensor_blob
from tests.unit.benchmark_fixtures import HashEncoder, tiny_llama

TENANT = "t"
SITES = parse_sites("1.block")
META = DictionaryMeta("fp", "m", SITES, 8, "enc", 4, "generic", "float32")


def file_bytes(path: Path) -> bytes:
    wal = Path(f"{path}-wal")
    return path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


def write_user(store: Store, user: str, seed: int, count: int = 2) -> list[bytes]:
    """Items and entries whose every part is unique; returns the byte strings to look for."""
    g = torch.Generator().manual_seed(seed)
    items = [
        HistoryItem(f"{user} private question {n}", f"{user} secret answer {n}", f"{user}-{n}")
        for n in range(count)
    ]
    store.add_items(TENANT, user, items)
    entries = [
        DictionaryEntry(
            i.item_id,
            torch.rand(4, generator=g),
            SteeringVector(SITES, torch.rand(1, 8, generator=g)),
        )
        for i in items
    ]
    store.put_entries(TENANT, user, META, entries)
    return [
        *(i.input.encode() for i in items),
        *(i.output.encode() for i in items),
        *(tensor_blob(e.key) for e in entries),
        *(tensor_blob(e.vector.values) for e in entries),
    ]


@pytest.mark.parametrize("where", ["wal", "checkpointed"])
def test_a_deleted_user_leaves_no_bytes(tmp_path: Path, where: str) -> None:
    path = tmp_path / "store.sqlite"
    with Store(path) as store:
        kept = write_user(store, "bob-4c1d", 1)
        if where == "checkpointed":
            store.checkpoint()
        gone = [*write_user(store, "alice-7f3a", 0), b"alice-7f3a"]
        if where == "checkpointed":
            store.checkpoint()
            assert all(m in path.read_bytes() for m in gone)  # the case is what it says
        else:
            assert all(m in Path(f"{path}-wal").read_bytes() for m in gone[:-1])
        store.delete_user(TENANT, "alice-7f3a")
        raw = file_bytes(path)
        assert [m for m in gone if m in raw] == []
        assert all(m in raw for m in kept)  # the check finds what is there
        assert store.integrity_check() == []


def age(store: Store, item_ids: list[str], days: float) -> None:
    then = (datetime.now(UTC) - timedelta(days=days)).isoformat(timespec="seconds")
    with store.transaction() as db:
        db.executemany(
            "UPDATE items SET created_at = ? WHERE item_id = ?", [(then, i) for i in item_ids]
        )


@pytest.mark.parametrize("where", ["wal", "checkpointed"])
def test_expired_items_leave_no_bytes(tmp_path: Path, where: str) -> None:
    path = tmp_path / "store.sqlite"
    with Store(path) as store:
        alice = write_user(store, "alice", 0, count=2)  # the first item expires
        carol = write_user(store, "carol-91ab", 2, count=1)  # all of it expires
        bob = write_user(store, "bob", 1)
        age(store, ["alice-0", "carol-91ab-0"], days=40)
        if where == "checkpointed":
            store.checkpoint()
        version = store.version(TENANT, "alice")
        assert expire_items(store, datetime.now(UTC) - timedelta(days=30)) == {TENANT: 2}
        assert expire_items(store, datetime.now(UTC) - timedelta(days=30)) == {}
        raw = file_bytes(path)
        expired = [alice[0], alice[2], alice[4], alice[6], *carol, b"carol-91ab"]
        assert [m for m in expired if m in raw] == []
        assert all(m in raw for m in [alice[1], alice[3], alice[5], alice[7], *bob])
        assert [i.item_id for i in store.items(TENANT, "alice")] == ["alice-1"]
        dictionary = store.dictionary(TENANT, "alice", "fp")
        assert dictionary is not None and dictionary.item_ids == ["alice-1"]
        assert store.version(TENANT, "alice") != version  # cached dictionaries reload
        assert store.users(TENANT) == ["alice", "bob"]
        assert store.integrity_check() == []


@pytest.fixture(scope="module")
def personalizer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Personalizer]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    store = Store(tmp_path_factory.mktemp("privacy") / "store.sqlite")
    yield Personalizer(tiny_llama(), store, encoder=HashEncoder())
    store.close()
    torch.set_num_threads(threads)


def test_the_server_expires_old_items_when_configured(personalizer: Personalizer) -> None:
    store = personalizer.store
    store.add_items("default", "dora", [HistoryItem("old", "one", "old"), HistoryItem("new", "x")])
    age(store, ["old"], days=3)
    config = ServerConfig(extract_on_write=False, max_wait_ms=0, expire_after_s=86400)
    app = create_app(personalizer, config)
    with RunningServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        for _ in range(1000):  # the expiry runs as the server starts
            listed = http.get("/v1/users/dora/interactions").json()["data"]
            if len(listed) == 1:
                break
            time.sleep(0.01)
        assert [i["id"] for i in listed] != ["old"] and len(listed) == 1
        assert "fints_items_expired_total 1.0" in http.get("/metrics").text


def test_expiry_settings_are_checked() -> None:
    with pytest.raises(InvalidInputError, match="expire_after_s"):
        ServerConfig(expire_after_s=0)


@pytest.mark.parametrize("how", ["delete", "expiry"])
def test_a_users_files_go_with_the_user(tmp_path: Path, how: str) -> None:
    """Per-user files beside the store (LoRA adapters live there) are removed by delete
    and by the expiry of the user's last item; another user's stay."""
    with Store(tmp_path / "store.sqlite") as store:
        for user in ("erin", "frank"):
            write_user(store, user, 3, count=1)
            folder = store.files_dir(TENANT, user) / "adapter"
            folder.mkdir(parents=True)
            (folder / "adapter_model.safetensors").write_bytes(b"weights of " + user.encode())
        if how == "delete":
            store.delete_user(TENANT, "erin")
        else:
            age(store, ["erin-0"], days=10)
            expire_items(store, datetime.now(UTC) - timedelta(days=1))
        assert not store.files_dir(TENANT, "erin").exists()
        assert (store.files_dir(TENANT, "frank") / "adapter").is_dir()
        leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and b"erin" in p.read_bytes()]
        assert leftovers == []
