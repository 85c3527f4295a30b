"""Where a tenant's task adapters and its users' adapters live: beside the store's
database, in the store's per-user folders (:meth:`fints.store.Store.files_dir`), one
folder per base model. Deleting a user deletes that folder with everything else."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from fints.adapters.config import AdapterMeta
from fints.adapters.files import (
    AdapterError,
    AdapterWeights,
    check_base,
    folder_bytes,
    read_adapter,
    read_meta,
    write_adapter,
)
from fints.adapters.host import expected_shapes, read_meta_config
from fints.errors import UnknownUserError
from fints.models import LoadedModel
from fints.store import Store, check_name


@dataclass(frozen=True)
class StoredAdapter:
    """A stored adapter: its folder and what it records (read and checked)."""

    folder: Path
    meta: AdapterMeta

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def bytes(self) -> int:
        return folder_bytes(self.folder)


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class AdapterStore:
    """The adapters of one store, for one base model."""

    def __init__(self, store: Store, model: LoadedModel) -> None:
        self.store = store
        self.model = model

    def user_folder(self, tenant: str, user: str) -> Path:
        return self.store.files_dir(tenant, user) / "lora" / self.model.fingerprint[:16]

    def task_folder(self, tenant: str, task: str) -> Path:
        check_name("task", task)
        root = self.store.files_dir(tenant) / "tasks" / _short(task)
        return root / self.model.fingerprint[:16]

    def _find(self, folder: Path) -> StoredAdapter | None:
        if not folder.is_dir():
            return None
        meta = read_meta(folder)
        check_base(meta, self.model.fingerprint, self.model.name)
        return StoredAdapter(folder, meta)

    def user_adapter(self, tenant: str, user: str) -> StoredAdapter | None:
        """The user's adapter for this model (None: they have none)."""
        return self._find(self.user_folder(tenant, user))

    def task_adapter(self, tenant: str, task: str) -> StoredAdapter | None:
        return self._find(self.task_folder(tenant, task))

    def require_user_adapter(self, tenant: str, user: str) -> StoredAdapter:
        if not self.store.has_user(tenant, user):
            raise UnknownUserError(f"unknown user {user!r} in tenant {tenant!r}")
        found = self.user_adapter(tenant, user)
        if found is None:
            raise AdapterError(
                f"user {user!r} in tenant {tenant!r} has no LoRA adapter for model "
                f"{self.model.name!r}; train one with `fints lora train`"
            )
        return found

    def weights(self, stored: StoredAdapter) -> AdapterWeights:
        """The stored weights, checked against this model."""
        expected = expected_shapes(self.model.model, read_meta_config(stored.folder))
        weights, _ = read_adapter(stored.folder, self.model.fingerprint, self.model.name, expected)
        return weights

    def save_user(
        self, tenant: str, user: str, weights: AdapterWeights, meta: dict[str, object]
    ) -> StoredAdapter:
        """Store ``user``'s adapter (replacing theirs); the user must exist."""
        if not self.store.has_user(tenant, user):
            raise UnknownUserError(f"unknown user {user!r} in tenant {tenant!r}")
        folder = self.user_folder(tenant, user)
        full = write_adapter(folder, weights, {**meta, "tenant": tenant, "owner": user})
        return StoredAdapter(folder, full)

    def save_task(
        self, tenant: str, task: str, weights: AdapterWeights, meta: dict[str, object]
    ) -> StoredAdapter:
        folder = self.task_folder(tenant, task)
        full = write_adapter(folder, weights, {**meta, "tenant": tenant, "owner": task})
        return StoredAdapter(folder, full)

    def import_user(self, source: Path, tenant: str, user: str) -> StoredAdapter:
        """Store the adapter in ``source`` as ``user``'s, after checking all of it (base
        model, digest, shapes); on any problem nothing is stored."""
        if not self.store.has_user(tenant, user):
            raise UnknownUserError(f"unknown user {user!r} in tenant {tenant!r}")
        expected = expected_shapes(self.model.model, read_meta_config(source))
        weights, meta = read_adapter(source, self.model.fingerprint, self.model.name, expected)
        fields = {k: v for k, v in meta.to_json().items() if k not in ("weights_sha256",)}
        fields.pop("created_at", None)
        fields["kind"] = "user"
        return self.save_user(tenant, user, weights, fields)

    def delete_user_adapter(self, tenant: str, user: str) -> bool:
        folder = self.user_folder(tenant, user)
        if not folder.is_dir():
            return False
        shutil.rmtree(folder)
        return True
