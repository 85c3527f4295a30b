"""The store's tables, and how names and tensors are checked and written into them."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fints.dictionary import DictionaryEntry, DictionaryMeta
from fints.errors import CorruptDataError, InvalidInputError, StoreUnavailableError
from fints.history import check_text

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    tenant TEXT NOT NULL,
    user TEXT NOT NULL,
    created_at TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, user)
);
CREATE TABLE IF NOT EXISTS items (
    tenant TEXT NOT NULL,
    user TEXT NOT NULL,
    item_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    input TEXT NOT NULL,
    output TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (tenant, user, item_id),
    FOREIGN KEY (tenant, user) REFERENCES users (tenant, user) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS dictionaries (
    tenant TEXT NOT NULL,
    user TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    meta TEXT NOT NULL,
    PRIMARY KEY (tenant, user, fingerprint),
    FOREIGN KEY (tenant, user) REFERENCES users (tenant, user) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS entries (
    tenant TEXT NOT NULL,
    user TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    item_id TEXT NOT NULL,
    key BLOB NOT NULL,
    vectors BLOB NOT NULL,
    checksum TEXT,  -- entry_checksum(key, vectors); NULL in stores written before it
    PRIMARY KEY (tenant, user, fingerprint, item_id),
    FOREIGN KEY (tenant, user, fingerprint)
        REFERENCES dictionaries (tenant, user, fingerprint) ON DELETE CASCADE
);
"""


def tensor_blob(tensor: torch.Tensor) -> bytes:
    return tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()


def tensor_from_blob(blob: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(blob, bytes) or len(blob) != 4 * int(np.prod(shape)):
        raise CorruptDataError(f"a stored tensor is not {shape} float32 values")
    return torch.from_numpy(np.frombuffer(blob, dtype=np.float32).copy()).reshape(shape)


def entry_checksum(key: bytes, vectors: bytes) -> str:
    """What an entry's row stores beside its blobs, to detect their corruption."""
    return hashlib.sha256(len(key).to_bytes(8, "little") + key + vectors).hexdigest()[:32]


def check_entry(where: str, key: bytes, vectors: bytes, checksum: str | None) -> None:
    """Refuse an entry whose blobs no longer match its checksum (None: written before
    checksums, not checked)."""
    if checksum is not None and entry_checksum(key, vectors) != checksum:
        raise CorruptDataError(
            f"{where}: its stored vectors fail their checksum (the file was damaged); the "
            "user's dictionary is not used. Delete the user and add the history again, or "
            "restore the store from a backup."
        )


def open_database(path: Path, read_only: bool) -> sqlite3.Connection:
    """The connection: WAL, synchronous=FULL, foreign keys, secure_delete; the tables
    created (or given their newer columns). ``read_only``: opened so, nothing written."""
    if read_only:
        uri = f"{path.resolve().as_uri()}?mode=ro"
        db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
    for pragma in ("synchronous=FULL", "foreign_keys=ON", "secure_delete=ON", "busy_timeout=10000"):
        db.execute(f"PRAGMA {pragma}")
    if not read_only:
        db.executescript(SCHEMA)
        columns = {r[1] for r in db.execute("PRAGMA table_info(entries)")}
        if "checksum" not in columns:
            db.execute("ALTER TABLE entries ADD COLUMN checksum TEXT")
    return db


def write_refused(exc: sqlite3.Error, path: Path) -> Exception:
    """The error for a failed write: :class:`StoreUnavailableError` when the store is
    read-only or its disk is full, else ``exc`` itself."""
    text = str(exc).lower()
    if "readonly" in text or "read-only" in text:
        return StoreUnavailableError(
            f"the store {str(path)!r} is read-only: writes are refused; reads and "
            "generation keep working",
            reason="read_only",
        )
    if "full" in text:
        return StoreUnavailableError(
            f"the disk of the store {str(path)!r} is full: writes are refused (nothing was "
            "written); reads and generation keep working",
            reason="full",
        )
    return exc


def digest(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not value.strip():
        shown = value[:40] if isinstance(value, str) else value
        raise InvalidInputError(f"{kind} name must be a non-empty string, got {shown!r}")
    if len(value) > 256 or any(ord(c) < 32 for c in value):
        raise InvalidInputError(f"{kind} name {value[:40]!r} is too long or has control characters")
    check_text(f"{kind} name", value)
    return value


def merged_norms(
    db: sqlite3.Connection,
    tenant: str,
    user: str,
    stored: DictionaryMeta,
    new: DictionaryMeta,
    entries: Sequence[DictionaryEntry],
) -> tuple[float, ...]:
    """The typical site norms over all of the user's entries: the stored ones weighted by
    the entries that stay, the new ones by the entries written now."""
    if not stored.site_norms or not new.site_norms:
        return new.site_norms or stored.site_norms
    written = {e.item_id for e in entries}
    kept = sum(
        1
        for (item_id,) in db.execute(
            "SELECT item_id FROM entries WHERE tenant = ? AND user = ? AND fingerprint = ?",
            (tenant, user, new.model_fingerprint),
        )
        if item_id not in written
    )
    total = kept + len(written)
    return tuple(
        (old * kept + now * len(written)) / total
        for old, now in zip(stored.site_norms, new.site_norms, strict=True)
    )
