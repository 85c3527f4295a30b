"""Per-user vector banks of the benchmark: every user's extracted activations at every
benchmark site (a method trained jointly at its sites, e.g. ``trained``: at its own
default sites), extracted once per (user, method) by the product's extractor and
cached on disk, and the context (model, task, query and history keys) the methods run in.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from fints.benchmark.labels import Label
from fints.benchmark.tasks import Query, Task
from fints.dictionary import DictionaryMeta, UserDictionary
from fints.encoders import KeyEncoder
from fints.errors import InvalidInputError
from fints.extraction import ExtractionConfig, Extractor, method_config
from fints.history import HistoryItem
from fints.models import LoadedModel
from fints.prompts import get_template
from fints.sites import Site, parse_sites
from fints.user_vectors import UserVectorMethod, user_vector

Contrast = str  # an extraction method's name (fints.extraction.METHODS)


@dataclass
class UserBank:
    """One user's per-item activations at every benchmark site, for one contrast."""

    user: str
    sites: tuple[Site, ...]
    item_ids: list[str]
    keys: torch.Tensor  # [N, key_dim]
    positive: torch.Tensor  # [N, sites, hidden]
    negative: torch.Tensor
    site_norms: torch.Tensor  # [sites]
    meta: DictionaryMeta
    _dicts: dict[tuple[Site, ...], UserDictionary] = field(default_factory=dict)
    _user_vectors: dict[tuple[tuple[Site, ...], str], UserDictionary] = field(default_factory=dict)

    @property
    def differences(self) -> torch.Tensor:
        return self.positive - self.negative

    def index(self, sites: Sequence[Site]) -> list[int]:
        missing = [str(s) for s in sites if s not in self.sites]
        if missing:
            raise InvalidInputError(
                f"sites {missing} were not extracted (extracted: {[str(s) for s in self.sites]})"
            )
        return [self.sites.index(s) for s in sites]

    def dictionary(self, sites: tuple[Site, ...]) -> UserDictionary:
        if sites not in self._dicts:
            idx = self.index(sites)
            meta = replace(
                self.meta,
                sites=sites,
                site_norms=tuple(float(self.site_norms[i]) for i in idx),
            )
            self._dicts[sites] = UserDictionary(
                self.user, meta, list(self.item_ids), self.keys, self.differences[:, idx]
            )
        return self._dicts[sites]

    def user_dictionary(self, sites: tuple[Site, ...], method: UserVectorMethod) -> UserDictionary:
        """The user-level vector as a dictionary of one entry (retrieval returns it as is)."""
        key = (sites, method)
        if key not in self._user_vectors:
            idx = self.index(sites)
            vector = user_vector(self.positive[:, idx], self.negative[:, idx], method)
            whole = self.dictionary(sites)
            self._user_vectors[key] = UserDictionary(
                self.user,
                whole.meta,
                [Label.user_vector(method)],
                torch.nn.functional.normalize(self.keys.mean(dim=0, keepdim=True), dim=-1),
                vector.unsqueeze(0),
            )
        return self._user_vectors[key]


class BenchContext:
    """One model, one task: query keys, history keys and vector banks, cached."""

    def __init__(
        self,
        model: LoadedModel,
        encoder: KeyEncoder,
        task: Task,
        sites: tuple[Site, ...],
        cache_dir: Path,
        *,
        extraction_batch: int = 8,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        self.model, self.encoder, self.task, self.sites = model, encoder, task, sites
        self.template = get_template(task.template)
        self.cache_dir = cache_dir
        self.extraction_batch = extraction_batch
        self.seed = seed
        self.progress = progress
        self._query_keys: dict[str, torch.Tensor] = {}
        self._history_keys: dict[str, torch.Tensor] = {}
        self._banks: dict[tuple[str, str], UserBank] = {}
        self._mean_differences: dict[str, dict[str, torch.Tensor]] = {}
        # the methods' tenant-level state (a trained shared vector), as the engine keeps it
        self._method_state: dict[str, Any] = {}
        self.extraction_seconds = 0.0

    def query_keys(self, queries: Sequence[Query]) -> torch.Tensor:
        missing = [q for q in queries if q.qid not in self._query_keys]
        if missing:
            keys = self.encoder.encode([q.input for q in missing])
            for q, k in zip(missing, keys, strict=True):
                self._query_keys[q.qid] = k
        return torch.stack([self._query_keys[q.qid] for q in queries])

    def history_keys(self, user: str) -> torch.Tensor:
        if user not in self._history_keys:
            history = self.task.users[user].history
            self._history_keys[user] = self.encoder.encode([i.input for i in history])
        return self._history_keys[user]

    def config(self, contrast: Contrast) -> ExtractionConfig:
        """How ``contrast`` is extracted: at every benchmark site, or, for a method whose
        vectors are trained jointly at their sites, at the method's own default sites."""
        settings = method_config(contrast, self._params(contrast))
        own = settings.default_sites(self.model.num_layers)
        return ExtractionConfig(
            sites=self.sites if settings.per_site else own,
            method=contrast,
            params=settings,
            batch_size=self.extraction_batch,
            seed=self.seed,
        )

    def _params(self, contrast: Contrast) -> dict[str, Any] | None:
        if contrast == "response":
            return {"rouge_threshold": 0.15 if self.task.name == "headlines" else 0.2}
        return None

    def pool(self, user: str, config: ExtractionConfig) -> list[HistoryItem]:
        """What the method draws other users' items from: the user's negatives, or, for a
        method with a tenant-level part (a shared vector), a seeded sample of every user's
        history (the tenant's), the same for every user."""
        settings = config.settings
        if not settings.pool_includes_user:
            return self.task.negatives_for(user)
        seen: dict[str, HistoryItem] = {}
        for name in sorted(self.task.users):
            for item in self.task.users[name].history:
                seen.setdefault(item.item_id, item)
        items = list(seen.values())
        rng = random.Random(f"{self.seed}:tenant-pool")
        return rng.sample(items, settings.pool_size) if len(items) > settings.pool_size else items

    def _bank_path(self, user: str, contrast: str) -> Path:
        history = self.task.users[user].history
        config = self.config(contrast)
        # a tenant-level part depends on every user's history and on the settings
        tenant = (
            [config.to_dict(), [i.item_id for i in self.pool(user, config)]]
            if config.settings.pool_includes_user
            else []
        )
        payload = json.dumps(
            [
                self.model.fingerprint,
                str(self.model.dtype),
                self.task.name,
                self.task.sha256,
                user,
                contrast,
                [str(s) for s in config.sites],
                [i.item_id for i in history],
                self.seed,
                self.encoder.name,
                *tenant,
            ]
        )
        digest = hashlib.sha256(payload.encode()).hexdigest()[:24]
        return self.cache_dir / "banks" / f"{digest}.pt"

    def bank(self, user: str, contrast: Contrast) -> UserBank:
        """The user's activations at every site (extracted once, cached on disk)."""
        key = (user, contrast)
        if key in self._banks:
            return self._banks[key]
        path = self._bank_path(user, contrast)
        if path.is_file():
            data = torch.load(path, weights_only=False)
            bank = UserBank(
                user,
                self.config(contrast).sites,
                data["item_ids"],
                data["keys"],
                data["positive"],
                data["negative"],
                data["site_norms"],
                DictionaryMeta.from_json(data["meta"]),
            )
        else:
            bank = self._extract(user, contrast)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(
                {
                    "item_ids": bank.item_ids,
                    "keys": bank.keys,
                    "positive": bank.positive,
                    "negative": bank.negative,
                    "site_norms": bank.site_norms,
                    "meta": bank.meta.to_json(),
                },
                tmp,
            )
            tmp.replace(path)
        self._banks[key] = bank
        return bank

    def shared_direction(
        self, exclude: Collection[str], contrast: Contrast, sites: Sequence[Site]
    ) -> torch.Tensor:
        """The mean difference of the users not in ``exclude`` at ``sites``: ``[sites, hidden]``.

        Each user's mean over their items counts once, so a long history does not
        dominate. It needs every user's bank (extracted on first use).
        """
        if contrast not in self._mean_differences:
            self._mean_differences[contrast] = {
                u: self.bank(u, contrast).differences.float().mean(dim=0) for u in self.task.users
            }
        others = [m for u, m in self._mean_differences[contrast].items() if u not in exclude]
        if not others:
            raise InvalidInputError(f"centering needs users besides {sorted(exclude)}")
        idx = self.bank(next(iter(self.task.users)), contrast).index(sites)
        return torch.stack(others).mean(dim=0)[idx]

    def _extract(self, user: str, contrast: Contrast) -> UserBank:
        """The user's entries as the product extracts them (:class:`Extractor`): every
        history item, the method's pool, the tenant-level state shared across users."""
        history = self.task.users[user].history
        config = self.config(contrast)
        sites = config.sites
        extractor = Extractor(self.model, self.encoder, self.template, config)
        start = time.perf_counter()
        result = extractor.extract(
            history,
            history,
            self.pool(user, config),
            progress=self.progress,
            shared=self._method_state,
        )
        self.extraction_seconds += time.perf_counter() - start
        if not result.entries:
            # Every pair was filtered out (response contrast): fall back to zero vectors.
            hidden = self.model.hidden_size
            zeros = torch.zeros(1, len(sites), hidden)
            keys = self.encoder.encode([history[-1].input])
            return UserBank(
                user, sites, [history[-1].item_id], keys, zeros, zeros,
                torch.ones(len(sites)), result.meta,
            )  # fmt: skip
        keys = torch.stack([e.key for e in result.entries])
        return UserBank(
            user,
            sites,
            [e.item_id for e in result.entries],
            keys,
            result.positive,
            result.negative,
            torch.tensor(result.meta.site_norms, dtype=torch.float32),
            result.meta,
        )


def benchmark_sites(num_layers: int, layers: Sequence[int] | None = None) -> tuple[Site, ...]:
    """attn, mlp and block at each layer (default: at 1/3, 1/2 and 2/3 of the depth)."""
    chosen = (
        sorted(set(layers))
        if layers
        else sorted({num_layers // 3, num_layers // 2, 2 * num_layers // 3})
    )
    bad = [layer for layer in chosen if not 0 <= layer < num_layers]
    if bad:
        raise InvalidInputError(f"layers {bad} out of range for a {num_layers}-layer model")
    return parse_sites(",".join(f"{layer}.attn+mlp+block" for layer in chosen))
