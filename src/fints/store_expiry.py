"""Optional expiry: forget history items older than a configured age.

An expired item goes with its dictionary entries (keys and vectors). A user left without
items is forgotten whole, files included (e.g. LoRA adapters), as
:meth:`Store.delete_user` does. What several items made together (a dictionary's site
norms, a user's trained vectors or adapter) stays while the user has items left. The
freed pages are zeroed (``secure_delete``) and the WAL emptied, so expired texts and
vectors leave the store's files.
"""

from __future__ import annotations

import shutil
from collections import Counter
from datetime import UTC, datetime

from fints.store import Store


def expire_items(store: Store, older_than: datetime) -> dict[str, int]:
    """Forget every item stored before ``older_than``; returns the items removed per
    tenant (empty: nothing was old enough)."""
    cutoff = older_than.astimezone(UTC).isoformat(timespec="seconds")
    gone_users: list[tuple[str, str]] = []
    with store.transaction() as db:
        rows = db.execute(
            "SELECT tenant, user, item_id FROM items WHERE created_at < ?", (cutoff,)
        ).fetchall()
        if not rows:
            return {}
        db.executemany("DELETE FROM entries WHERE tenant = ? AND user = ? AND item_id = ?", rows)
        db.executemany("DELETE FROM items WHERE tenant = ? AND user = ? AND item_id = ?", rows)
        for tenant, user in sorted({(t, u) for t, u, _ in rows}):
            left = db.execute(
                "SELECT 1 FROM items WHERE tenant = ? AND user = ? LIMIT 1", (tenant, user)
            ).fetchone()
            if left is None:
                for table in ("entries", "dictionaries", "users"):
                    db.execute(f"DELETE FROM {table} WHERE tenant = ? AND user = ?", (tenant, user))
                gone_users.append((tenant, user))
            else:  # the user's data changed: caches keyed by its version reload
                db.execute(
                    "UPDATE users SET version = version + 1 WHERE tenant = ? AND user = ?",
                    (tenant, user),
                )
    for tenant, user in gone_users:
        shutil.rmtree(store.files_dir(tenant, user), ignore_errors=True)
    store.checkpoint()
    return dict(Counter(tenant for tenant, _, _ in rows))
