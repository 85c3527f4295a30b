"""The extractor: runs the configured method over history items and builds entries."""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from fints.dictionary import DictionaryEntry, DictionaryMeta, UserDictionary
from fints.encoders import KeyEncoder
from fints.errors import InvalidInputError
from fints.extraction.base import METHODS, ExtractionJob, ExtractionResult, MethodContext
from fints.extraction.config import ExtractionConfig
from fints.history import HistoryItem
from fints.models import LoadedModel
from fints.prompts import PromptTemplate
from fints.sites import check_layers_in_range
from fints.steering import SteeringVector
from fints.steps import Steps, run_to_end


class Extractor:
    """Builds dictionary entries for one model, key encoder and prompt template."""

    def __init__(
        self,
        model: LoadedModel,
        encoder: KeyEncoder,
        template: PromptTemplate,
        config: ExtractionConfig,
    ) -> None:
        check_layers_in_range(config.sites, model.num_layers)
        self.model, self.encoder, self.template, self.config = model, encoder, template, config

    def meta(self, site_norms: Sequence[float]) -> DictionaryMeta:
        """What the entries are made with: a dictionary records its method and settings."""
        cfg = self.config
        return DictionaryMeta(
            model_fingerprint=self.model.fingerprint,
            model_name=self.model.name,
            sites=cfg.sites,
            hidden_size=self.model.hidden_size,
            key_encoder=self.encoder.name,
            key_dim=self.encoder.dim,
            prompt_template=self.template.name,
            dtype=str(self.model.dtype).removeprefix("torch."),
            method=cfg.method,
            method_config=cfg.to_dict(),
            site_norms=tuple(float(x) for x in site_norms),
        )

    def extract(
        self,
        items: Sequence[HistoryItem],
        history: Sequence[HistoryItem],
        negative_pool: Sequence[HistoryItem],
        *,
        progress: bool = True,
        previous: UserDictionary | None = None,
        shared: MutableMapping[str, Any] | None = None,
    ) -> ExtractionResult:
        """Entries for ``items``; own context comes from ``history`` (the user's items),
        other users' from ``negative_pool``. ``previous`` is the user's current dictionary
        (methods that refit the user start from it); ``shared`` the tenant's method state."""
        return run_to_end(
            self.extract_steps(
                items,
                history,
                negative_pool,
                progress=progress,
                previous=previous,
                shared=shared,
            )
        )

    def extract_steps(
        self,
        items: Sequence[HistoryItem],
        history: Sequence[HistoryItem],
        negative_pool: Sequence[HistoryItem],
        *,
        progress: bool = True,
        previous: UserDictionary | None = None,
        shared: MutableMapping[str, Any] | None = None,
        piece_items: int | None = None,
    ) -> Steps[ExtractionResult]:
        """:meth:`extract` in steps (:mod:`fints.steps`): methods that run long (trained
        vectors) yield after each piece of at most ``piece_items`` examples."""
        if not items:
            raise InvalidInputError("no history items to extract from")
        cfg = self.config
        bar = tqdm(
            total=len(items),
            desc=f"extracting ({cfg.method})",
            unit="item",
            disable=not progress,
        )
        context = MethodContext(
            self.model,
            self.encoder,
            self.template,
            cfg.sites,
            cfg.batch_size,
            cfg.max_target_tokens,
            cfg.seed,
            advance=bar.update,
            shared={} if shared is None else shared,
            piece_items=piece_items,
        )
        with bar:
            sides = yield from METHODS[cfg.method].run(
                context, cfg.settings, ExtractionJob(items, history, negative_pool, previous)
            )
        site_norms = sides.norms.mean(dim=0) if len(sides.kept) else torch.zeros(len(cfg.sites))
        keys = self.encoder.encode([items[i].input for i in sides.kept]) if sides.kept else None
        differences = sides.positive - sides.negative
        entries = [
            DictionaryEntry(items[i].item_id, keys[n], SteeringVector(cfg.sites, differences[n]))
            for n, i in enumerate(sides.kept)
            if keys is not None
        ]
        return ExtractionResult(
            self.meta(site_norms.tolist()), entries, sides.positive, sides.negative, sides.skipped
        )
