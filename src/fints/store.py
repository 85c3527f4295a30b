"""The embedded, transactional store of users' history and steering dictionaries.

SQLite in WAL mode with ``synchronous=FULL``: a write that returned is on disk,
and a process killed mid-write leaves the previous state. Every row is scoped
to a tenant, and ``secure_delete`` overwrites what a deleted user leaves behind.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from fints.dictionary import DictionaryEntry, DictionaryMeta, UserDictionary, check_finite, now_iso
from fints.errors import (
    CorruptDataError,
    DictionaryMismatchError,
    InvalidInputError,
    LimitExceededError,
    UnknownUserError,
)
from fints.history import HistoryItem, check_unique_ids
from fints.store_schema import (
    check_entry,
    check_name,
    digest,
    entry_checksum,
    merged_norms,
    open_database,
    tensor_blob,
    tensor_from_blob,
    write_refused,
)

__all__ = ["DEFAULT_TENANT", "Store", "check_name"]

DEFAULT_TENANT = "default"


class Store:
    """Thread-safe access to one SQLite file. Every method is tenant-scoped."""

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        """``read_only``: open an existing store without writing to it (every write is a
        :class:`StoreUnavailableError`; reads work)."""
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = open_database(self.path, read_only)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All-or-nothing: commit on success, roll back on any exception."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise write_refused(exc, self.path) from None
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):  # a full disk may have rolled back
                    self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError):
                    raise write_refused(exc, self.path) from exc
                raise

    def _query(self, sql: str, args: Sequence[object] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- users and history -------------------------------------------------------------

    def users(self, tenant: str = DEFAULT_TENANT) -> list[str]:
        return [
            r[0]
            for r in self._query("SELECT user FROM users WHERE tenant = ? ORDER BY user", (tenant,))
        ]

    def has_user(self, tenant: str, user: str) -> bool:
        return bool(
            self._query("SELECT 1 FROM users WHERE tenant = ? AND user = ?", (tenant, user))
        )

    def version(self, tenant: str, user: str) -> int | None:
        """A counter bumped by every write to the user (for cache invalidation)."""
        rows = self._query(
            "SELECT version FROM users WHERE tenant = ? AND user = ?", (tenant, user)
        )
        return int(rows[0][0]) if rows else None

    def add_items(
        self,
        tenant: str,
        user: str,
        items: Sequence[HistoryItem],
        *,
        max_items: int | None = None,
    ) -> list[str]:
        """Append history items atomically. Idempotent: an item the user already has with
        the same id and the same texts is left as it is (a retried write succeeds); the same
        id with other texts rejects the whole batch. With ``max_items``, a write that would
        give the user more items is refused whole (:class:`LimitExceededError`)."""
        check_name("tenant", tenant)
        check_name("user", user)
        if not items:
            raise InvalidInputError("no history items to add")
        check_unique_ids(items)
        with self.transaction() as db:
            self._insert_items(db, tenant, user, items, max_items)
        return [i.item_id for i in items]

    def _insert_items(
        self,
        db: sqlite3.Connection,
        tenant: str,
        user: str,
        items: Sequence[HistoryItem],
        max_items: int | None = None,
    ) -> None:
        existing = {
            r[0]: (r[1], r[2])
            for r in db.execute(
                f"SELECT item_id, input, output FROM items WHERE tenant = ? AND user = ? "
                f"AND item_id IN ({','.join('?' * len(items))})",
                (tenant, user, *[i.item_id for i in items]),
            )
        }
        conflicts = sorted(
            i.item_id
            for i in items
            if existing.get(i.item_id, (i.input, i.output)) != (i.input, i.output)
        )
        if conflicts:
            shown = [c if len(c) <= 40 else c[:40] + "..." for c in conflicts[:5]]
            raise InvalidInputError(
                f"user {user!r} already has item(s) {shown} with other texts; nothing was "
                "added (an item id can be written again only with the same input and output)"
            )
        items = [i for i in items if i.item_id not in existing]  # the rest are stored already
        if not items:
            return
        if max_items is not None:
            (count,) = db.execute(
                "SELECT COUNT(*) FROM items WHERE tenant = ? AND user = ?", (tenant, user)
            ).fetchone()
            if count + len(items) > max_items:
                raise LimitExceededError(
                    f"user {user!r} has {count} history items; {len(items)} more would pass "
                    f"the limit max_items_per_user of {max_items}; nothing was added",
                    limit="max_items_per_user",
                    param="items",
                )
        self._touch(db, tenant, user)
        (seq,) = db.execute(
            "SELECT COALESCE(MAX(seq), -1) + 1 FROM items WHERE tenant = ? AND user = ?",
            (tenant, user),
        ).fetchone()
        created = now_iso()
        db.executemany(
            "INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (tenant, user, i.item_id, seq + n, i.input, i.output, created)
                for n, i in enumerate(items)
            ],
        )

    def _touch(self, db: sqlite3.Connection, tenant: str, user: str) -> None:
        db.execute(
            "INSERT INTO users (tenant, user, created_at, version) VALUES (?, ?, ?, 1) "
            "ON CONFLICT (tenant, user) DO UPDATE SET version = version + 1",
            (tenant, user, now_iso()),
        )

    def items(self, tenant: str, user: str) -> list[HistoryItem]:
        self._require_user(tenant, user)
        rows = self._query(
            "SELECT input, output, item_id FROM items WHERE tenant = ? AND user = ? ORDER BY seq",
            (tenant, user),
        )
        return [HistoryItem(*r) for r in rows]

    def items_without_entries(self, tenant: str, user: str, fingerprint: str) -> list[HistoryItem]:
        rows = self._query(
            "SELECT i.input, i.output, i.item_id FROM items i WHERE i.tenant = ? AND i.user = ? "
            "AND NOT EXISTS (SELECT 1 FROM entries e WHERE e.tenant = i.tenant "
            "AND e.user = i.user AND e.fingerprint = ? AND e.item_id = i.item_id) ORDER BY i.seq",
            (tenant, user, fingerprint),
        )
        return [HistoryItem(*r) for r in rows]

    def sample_items(
        self, tenant: str, limit: int, seed: int = 0, *, exclude_user: str | None = None
    ) -> list[HistoryItem]:
        """A seeded random sample of the tenant's items (but ``exclude_user``'s)."""
        rowids = [
            r[0]
            for r in self._query(
                "SELECT rowid FROM items WHERE tenant = ? AND user != ? ORDER BY rowid",
                (tenant, exclude_user if exclude_user is not None else ""),
            )
        ]
        chosen = random.Random(seed).sample(rowids, min(limit, len(rowids)))
        if not chosen:
            return []
        rows = self._query(
            f"SELECT rowid, input, output, item_id FROM items "
            f"WHERE rowid IN ({','.join('?' * len(chosen))})",
            chosen,
        )
        by_rowid = {r[0]: HistoryItem(*r[1:]) for r in rows}
        return [by_rowid[r] for r in chosen]

    def _require_user(self, tenant: str, user: str) -> None:
        if not self.has_user(tenant, user):
            raise UnknownUserError(f"unknown user {user!r} in tenant {tenant!r}")

    def files_dir(self, tenant: str, user: str | None = None) -> Path:
        """The folder beside the database for a tenant's (or one user's) files, e.g. LoRA
        adapters; named by digests, since names may hold any character."""
        root = self.path.with_name(self.path.name + ".files") / digest(tenant)
        return root if user is None else root / "users" / digest(user)

    def delete_user(self, tenant: str, user: str) -> None:
        """Forget a user: items, keys, vectors, metadata and their files (e.g. LoRA
        adapters); the freed pages are zeroed."""
        self._require_user(tenant, user)
        with self.transaction() as db:
            for table in ("entries", "dictionaries", "items", "users"):
                db.execute(f"DELETE FROM {table} WHERE tenant = ? AND user = ?", (tenant, user))
        shutil.rmtree(self.files_dir(tenant, user), ignore_errors=True)
        self.checkpoint()

    def checkpoint(self) -> None:
        """Copy the WAL (and the pages a delete zeroed) into the main file; empty the WAL."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- dictionaries ---------------------------------------------------------------------

    def put_entries(
        self, tenant: str, user: str, meta: DictionaryMeta, entries: Sequence[DictionaryEntry]
    ) -> None:
        """Add or replace dictionary entries, all or none; each must match ``meta``."""
        self._require_user(tenant, user)
        with self.transaction() as db:
            self._insert_entries(db, tenant, user, meta, entries)

    def _insert_entries(
        self,
        db: sqlite3.Connection,
        tenant: str,
        user: str,
        meta: DictionaryMeta,
        entries: Sequence[DictionaryEntry],
    ) -> None:
        for entry in entries:
            if entry.vector.sites != meta.sites:
                raise InvalidInputError(
                    f"entry {entry.item_id!r} has sites {[str(s) for s in entry.vector.sites]}, "
                    f"the dictionary {[str(s) for s in meta.sites]}"
                )
            if tuple(entry.vector.values.shape) != (len(meta.sites), meta.hidden_size):
                raise InvalidInputError(
                    f"entry {entry.item_id!r} vectors have shape "
                    f"{tuple(entry.vector.values.shape)}, expected "
                    f"({len(meta.sites)}, {meta.hidden_size})"
                )
            if tuple(entry.key.shape) != (meta.key_dim,):
                raise InvalidInputError(
                    f"entry {entry.item_id!r} key has shape {tuple(entry.key.shape)}, "
                    f"expected ({meta.key_dim},)"
                )
            check_finite(f"entry {entry.item_id!r} vectors", entry.vector.values)
            check_finite(f"entry {entry.item_id!r} key", entry.key)
        row = db.execute(
            "SELECT meta FROM dictionaries WHERE tenant = ? AND user = ? AND fingerprint = ?",
            (tenant, user, meta.model_fingerprint),
        ).fetchone()
        if row is None:
            db.execute(
                "INSERT INTO dictionaries VALUES (?, ?, ?, ?)",
                (tenant, user, meta.model_fingerprint, json.dumps(meta.to_json())),
            )
        else:
            stored = DictionaryMeta.from_json(json.loads(row[0]))
            if not stored.same_space(meta):
                raise DictionaryMismatchError(
                    f"user {user!r} already has a dictionary for this model with other sites, "
                    "key encoder or extraction method; delete it (or the user) before building "
                    "another"
                )
            merged = replace(meta, site_norms=merged_norms(db, tenant, user, stored, meta, entries))
            db.execute(
                "UPDATE dictionaries SET meta = ? "
                "WHERE tenant = ? AND user = ? AND fingerprint = ?",
                (json.dumps(merged.to_json()), tenant, user, meta.model_fingerprint),
            )
        db.executemany(
            "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (tenant, user, meta.model_fingerprint, e.item_id, k, v, entry_checksum(k, v))
                for e in entries
                for k, v in [(tensor_blob(e.key), tensor_blob(e.vector.values))]
            ],
        )
        self._touch(db, tenant, user)

    def dictionary(self, tenant: str, user: str, fingerprint: str) -> UserDictionary | None:
        """The user's dictionary for a model, or None if nothing was extracted yet."""
        self._require_user(tenant, user)
        with self._lock:
            row = self._db.execute(
                "SELECT meta FROM dictionaries WHERE tenant = ? AND user = ? AND fingerprint = ?",
                (tenant, user, fingerprint),
            ).fetchone()
            if row is None:
                return None
            meta = DictionaryMeta.from_json(json.loads(row[0]))
            rows = self._db.execute(
                "SELECT e.item_id, e.key, e.vectors, i.input, i.output, e.checksum FROM entries e "
                "LEFT JOIN items i ON i.tenant = e.tenant AND i.user = e.user "
                "AND i.item_id = e.item_id WHERE e.tenant = ? AND e.user = ? "
                "AND e.fingerprint = ? ORDER BY i.seq, e.item_id",
                (tenant, user, fingerprint),
            ).fetchall()
        if not rows:
            return None
        for r in rows:
            check_entry(f"entry {r[0]!r} of user {user!r}", r[1], r[2], r[5])
        shape = (len(meta.sites), meta.hidden_size)
        return UserDictionary(
            user=user,
            meta=meta,
            item_ids=[r[0] for r in rows],
            keys=torch.stack([tensor_from_blob(r[1], (meta.key_dim,)) for r in rows]),
            vectors=torch.stack([tensor_from_blob(r[2], shape) for r in rows]),
            items=[HistoryItem(r[3], r[4], r[0]) for r in rows if r[3] is not None],
        )

    def import_dictionary(
        self, tenant: str, dictionary: UserDictionary, user: str | None = None
    ) -> None:
        """Store an exported dictionary (and its texts) under ``user``; all or nothing."""
        user = check_name("user", user or dictionary.user)
        if self.has_user(tenant, user):
            raise InvalidInputError(
                f"user {user!r} already exists in tenant {tenant!r}; delete it or import under "
                "another name"
            )
        if not len(dictionary):
            raise InvalidInputError("the dictionary has no entries; there is nothing to import")
        texts = {i.item_id: i for i in dictionary.items}
        missing = [i for i in dictionary.item_ids if i not in texts]
        if missing:
            raise InvalidInputError(
                f"the dictionary has no history texts for {len(missing)} entries "
                "(export with texts to import it)"
            )
        entries = [dictionary.entry(n) for n in range(len(dictionary))]
        with self.transaction() as db:
            self._insert_items(db, tenant, user, [texts[i] for i in dictionary.item_ids])
            self._insert_entries(db, tenant, user, dictionary.meta, entries)

    def integrity_check(self) -> list[str]:
        """SQLite's own check plus referential checks; an empty list means healthy."""
        problems = [r[0] for r in self._query("PRAGMA integrity_check") if r[0] != "ok"]
        problems += [f"foreign key violation: {r}" for r in self._query("PRAGMA foreign_key_check")]
        for tenant, user, item_id, key, values, checksum in self._query(
            "SELECT tenant, user, item_id, key, vectors, checksum FROM entries"
        ):
            try:
                check_entry(f"entry {item_id!r} of {tenant}/{user}", key, values, checksum)
            except CorruptDataError as exc:
                problems.append(str(exc))
        return problems
