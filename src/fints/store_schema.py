"""The store's tables, and how names and tensors are checked and written into them."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from fints.errors import InvalidInputError
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
    PRIMARY KEY (tenant, user, fingerprint, item_id),
    FOREIGN KEY (tenant, user, fingerprint)
        REFERENCES dictionaries (tenant, user, fingerprint) ON DELETE CASCADE
);
"""


def tensor_blob(tensor: torch.Tensor) -> bytes:
    return tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()


def tensor_from_blob(blob: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(blob, dtype=np.float32).copy()).reshape(shape)


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
