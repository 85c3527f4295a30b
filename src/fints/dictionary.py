"""A user's steering dictionary: keys (input embeddings) and per-site vectors.

On disk (export/import), a dictionary is a folder with ``vectors.safetensors``
(``keys`` ``[N, key_dim]`` and ``vectors`` ``[N, sites, hidden]``) and
``dictionary.json`` (metadata, item ids and, optionally, the history texts).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fints.errors import DictionaryMismatchError, InvalidInputError
from fints.history import HistoryItem
from fints.sites import Site, parse_sites
from fints.steering import SteeringVector

FORMAT_VERSION = 1
TENSORS_FILE = "vectors.safetensors"
META_FILE = "dictionary.json"
#: Exported files are readable by their owner only.
PRIVATE_MODE = 0o600


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class DictionaryMeta:
    """What a dictionary was made with; a model that differs cannot use it."""

    model_fingerprint: str
    model_name: str
    sites: tuple[Site, ...]
    hidden_size: int
    key_encoder: str
    key_dim: int
    prompt_template: str
    dtype: str
    method: str = "context"  # the extraction method (a name in fints.extraction.METHODS)
    method_config: dict[str, Any] = field(default_factory=dict)  # its ExtractionConfig.to_dict()
    site_norms: tuple[float, ...] = ()  # typical activation norm per site
    created_at: str = field(default_factory=now_iso)

    def __post_init__(self) -> None:
        for name in ("model_fingerprint", "model_name", "key_encoder", "prompt_template"):
            if not isinstance(getattr(self, name), str):
                raise InvalidInputError(f"field {name!r} must be a string")
        for name in ("dtype", "method", "created_at"):
            if not isinstance(getattr(self, name), str):
                raise InvalidInputError(f"field {name!r} must be a string")
        for name in ("hidden_size", "key_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"field {name!r} must be an integer >= 1, got {value!r}")
        if not isinstance(self.method_config, dict):
            raise InvalidInputError("field 'method_config' must be a JSON object")
        if not all(math.isfinite(x) for x in self.site_norms):
            raise InvalidInputError("field 'site_norms' must hold finite numbers")
        if self.site_norms and len(self.site_norms) != len(self.sites):
            raise InvalidInputError(
                f"{len(self.site_norms)} site norms for {len(self.sites)} sites"
            )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["sites"] = [str(s) for s in self.sites]
        data["site_norms"] = list(self.site_norms)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DictionaryMeta:
        try:
            fields = dict(data)
            if "contrast" in fields:  # written before methods had a registry
                fields["method"] = fields.pop("contrast")
            fields["sites"] = parse_sites(fields["sites"])
            fields["site_norms"] = tuple(float(x) for x in fields.get("site_norms", ()))
            return cls(**fields)
        except KeyError as exc:
            raise InvalidInputError(f"dictionary metadata is missing field {exc}") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise InvalidInputError(f"dictionary metadata is malformed: {exc}") from None

    def same_space(self, other: DictionaryMeta) -> bool:
        """True when entries made under ``other`` can live in the same dictionary."""
        return (
            self.model_fingerprint == other.model_fingerprint
            and self.sites == other.sites
            and self.hidden_size == other.hidden_size
            and self.key_encoder == other.key_encoder
            and self.key_dim == other.key_dim
            and self.method == other.method
        )

    def check_model(self, fingerprint: str, hidden_size: int, num_layers: int) -> None:
        if self.model_fingerprint != fingerprint:
            raise DictionaryMismatchError(
                f"this dictionary was extracted from model {self.model_name!r} "
                f"(fingerprint {self.model_fingerprint[:12]}), not from the loaded model "
                f"(fingerprint {fingerprint[:12]}); re-extract it with `fints build`"
            )
        if self.hidden_size != hidden_size:
            raise DictionaryMismatchError(
                f"dictionary hidden size {self.hidden_size} != model hidden size {hidden_size}"
            )
        deepest = max(site.layer for site in self.sites)
        if deepest >= num_layers:
            raise DictionaryMismatchError(
                f"dictionary site layer {deepest} is out of range for a {num_layers}-layer model"
            )


@dataclass(frozen=True)
class DictionaryEntry:
    """One history item's key and steering vector."""

    item_id: str
    key: torch.Tensor  # [key_dim]
    vector: SteeringVector


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise InvalidInputError(f"{name} contains NaN or infinite values")


@dataclass
class UserDictionary:
    """Every entry of one user for one model, stacked for fast retrieval."""

    user: str
    meta: DictionaryMeta
    item_ids: list[str]
    keys: torch.Tensor  # [N, key_dim], L2-normalised float32
    vectors: torch.Tensor  # [N, sites, hidden] float32
    items: list[HistoryItem] = field(default_factory=list)  # texts, when known

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        if len(set(self.item_ids)) != n:
            raise InvalidInputError("item_ids must be unique")
        if self.keys.shape != (n, self.meta.key_dim):
            raise InvalidInputError(
                f"keys have shape {tuple(self.keys.shape)}, expected ({n}, {self.meta.key_dim})"
            )
        expected = (n, len(self.meta.sites), self.meta.hidden_size)
        if tuple(self.vectors.shape) != expected:
            raise InvalidInputError(
                f"vectors have shape {tuple(self.vectors.shape)}, expected {expected}"
            )
        check_finite("dictionary keys", self.keys)
        check_finite("dictionary vectors", self.vectors)

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def site_norms(self) -> torch.Tensor:
        norms = self.meta.site_norms or tuple(math.nan for _ in self.meta.sites)
        return torch.tensor(norms, dtype=torch.float32)

    def entry(self, index: int) -> DictionaryEntry:
        return DictionaryEntry(
            self.item_ids[index],
            self.keys[index],
            SteeringVector(self.meta.sites, self.vectors[index]),
        )

    def save(self, folder: str | Path, *, include_texts: bool = True) -> Path:
        """Write both files readable by their owner only (mode 0600): they hold what the
        user wrote (the texts) and what was learned from it (the vectors)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors_path = folder / TENSORS_FILE
        save_file(
            {"keys": self.keys.contiguous(), "vectors": self.vectors.contiguous()},
            str(tensors_path),
            metadata={"format": "fints-dictionary", "version": str(FORMAT_VERSION)},
        )
        os.chmod(tensors_path, PRIVATE_MODE)
        payload = {
            "format_version": FORMAT_VERSION,
            "user": self.user,
            "meta": self.meta.to_json(),
            "item_ids": self.item_ids,
            "items": [i.to_json() for i in self.items] if include_texts else [],
        }
        meta_path = folder / META_FILE
        fd = os.open(meta_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_MODE)
        os.fchmod(fd, PRIVATE_MODE)  # also when the file was there before, with another mode
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(payload, indent=2, ensure_ascii=False))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> UserDictionary:
        folder = Path(folder)
        tensors_path, meta_path = folder / TENSORS_FILE, folder / META_FILE
        for path in (tensors_path, meta_path):
            if not path.is_file():
                raise InvalidInputError(f"not a fints dictionary folder: {str(path)!r} is missing")
        try:
            payload = json.loads(meta_path.read_text(encoding="utf-8"))
            tensors = load_file(str(tensors_path))
        except (json.JSONDecodeError, OSError, Exception) as exc:
            raise InvalidInputError(f"cannot read dictionary in {str(folder)!r}: {exc}") from None
        try:
            return cls._from_payload(payload, tensors, str(meta_path), str(tensors_path))
        except InvalidInputError as exc:
            raise InvalidInputError(f"malformed dictionary in {str(folder)!r}: {exc}") from None

    @classmethod
    def _from_payload(
        cls, payload: Any, tensors: dict[str, torch.Tensor], meta_file: str, tensors_file: str
    ) -> UserDictionary:
        """The dictionary described by a parsed ``dictionary.json`` and its tensors; a missing
        or mistyped field is an :class:`InvalidInputError` naming it."""
        if not isinstance(payload, dict):
            raise InvalidInputError(f"{meta_file} must hold a JSON object")
        if payload.get("format_version") != FORMAT_VERSION:
            raise InvalidInputError(
                f"unsupported dictionary format version {payload.get('format_version')!r}"
            )
        user = _field(payload, "user", str, meta_file)
        meta = _field(payload, "meta", dict, meta_file)
        item_ids = _field(payload, "item_ids", list, meta_file)
        records = payload.get("items", [])
        if not isinstance(records, list):
            raise InvalidInputError(f"{meta_file}: 'items' must be a list")
        if not all(isinstance(x, str) for x in item_ids):
            raise InvalidInputError(f"{meta_file}: 'item_ids' must be a list of strings")
        items = []
        for n, record in enumerate(records):
            where = f"{meta_file}: items[{n}]"
            if not isinstance(record, dict):
                raise InvalidInputError(f"{where} must be a JSON object")
            items.append(
                HistoryItem(
                    _field(record, "input", str, where),
                    _field(record, "output", str, where),
                    _field(record, "id", str, where),
                )
            )
        missing = [name for name in ("keys", "vectors") if name not in tensors]
        if missing:
            raise InvalidInputError(f"{tensors_file} has no tensor(s) {missing}")
        try:
            parsed_meta = DictionaryMeta.from_json(meta)
        except (InvalidInputError, ValueError) as exc:
            raise InvalidInputError(f"{meta_file}: 'meta': {exc}") from None
        return cls(
            user=user,
            meta=parsed_meta,
            item_ids=list(item_ids),
            keys=tensors["keys"].to(torch.float32),
            vectors=tensors["vectors"].to(torch.float32),
            items=items,
        )


def _field(record: dict[str, Any], name: str, kind: type, where: str) -> Any:
    """``record[name]``, which must be there and be of ``kind``."""
    if name not in record:
        raise InvalidInputError(f"{where}: missing field {name!r}")
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidInputError(
            f"{where}: field {name!r} must be a {_JSON_KIND.get(kind, kind.__name__)}, "
            f"got {type(value).__name__}"
        )
    return value


_JSON_KIND: dict[type, str] = {str: "string", dict: "JSON object", list: "list"}
