"""fints: inference-time personalization of open-weight LLMs with steering vectors.

The public API is importable from the top level; each name is loaded on first use,
so ``import fints`` (and ``import fints.sites``) does not pull in torch or transformers
until a name that needs them is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Every public name and the module that defines it.
_EXPORTS = {
    # sites and model layout
    "Component": "fints.sites",
    "Site": "fints.sites",
    "parse_sites": "fints.sites",
    "default_sites": "fints.sites",
    "LayerPaths": "fints.layers",
    "DecoderLayout": "fints.layers",
    "resolve_layout": "fints.layers",
    # recording, injection, steering
    "SiteMeans": "fints.recording",
    "record_means": "fints.recording",
    "steer": "fints.injection",
    "SteeringConfig": "fints.steering",
    "SteeringVector": "fints.steering",
    # history, dictionaries, extraction, retrieval
    "HistoryItem": "fints.history",
    "read_history": "fints.history",
    "DictionaryEntry": "fints.dictionary",
    "DictionaryMeta": "fints.dictionary",
    "UserDictionary": "fints.dictionary",
    "ExtractionConfig": "fints.extraction",
    "ExtractionResult": "fints.extraction",
    "Extractor": "fints.extraction",
    "user_vector": "fints.user_vectors",
    "Retrieved": "fints.retrieval",
    "retrieve_and_aggregate": "fints.retrieval",
    "KeyEncoder": "fints.encoders",
    "SentenceTransformerEncoder": "fints.encoders",
    # models, store, engine
    "Store": "fints.store",
    "load_model": "fints.models",
    "LoadedModel": "fints.models",
    "PromptTemplate": "fints.prompts",
    "GenerationOptions": "fints.generation",
    "GenerationRequest": "fints.engine",
    "GenerationResult": "fints.engine",
    "Personalizer": "fints.engine",
    "UnknownUser": "fints.engine",
    # errors
    "FintsError": "fints.errors",
    "InvalidInputError": "fints.errors",
    "UnknownUserError": "fints.errors",
    "DictionaryMismatchError": "fints.errors",
    "UnsupportedModelError": "fints.errors",
}

__all__ = [
    "Component",
    "DecoderLayout",
    "DictionaryEntry",
    "DictionaryMeta",
    "DictionaryMismatchError",
    "ExtractionConfig",
    "ExtractionResult",
    "Extractor",
    "FintsError",
    "GenerationOptions",
    "GenerationRequest",
    "GenerationResult",
    "HistoryItem",
    "InvalidInputError",
    "KeyEncoder",
    "LayerPaths",
    "LoadedModel",
    "Personalizer",
    "PromptTemplate",
    "Retrieved",
    "SentenceTransformerEncoder",
    "Site",
    "SiteMeans",
    "SteeringConfig",
    "SteeringVector",
    "Store",
    "UnknownUser",
    "UnknownUserError",
    "UnsupportedModelError",
    "UserDictionary",
    "default_sites",
    "load_model",
    "parse_sites",
    "read_history",
    "record_means",
    "resolve_layout",
    "retrieve_and_aggregate",
    "steer",
    "user_vector",
]

if TYPE_CHECKING:
    from fints.dictionary import DictionaryEntry, DictionaryMeta, UserDictionary
    from fints.encoders import KeyEncoder, SentenceTransformerEncoder
    from fints.engine import GenerationRequest, GenerationResult, Personalizer, UnknownUser
    from fints.errors import (
        DictionaryMismatchError,
        FintsError,
        InvalidInputError,
        UnknownUserError,
        UnsupportedModelError,
    )
    from fints.extraction import ExtractionConfig, ExtractionResult, Extractor
    from fints.generation import GenerationOptions
    from fints.history import HistoryItem, read_history
    from fints.injection import steer
    from fints.layers import DecoderLayout, LayerPaths, resolve_layout
    from fints.models import LoadedModel, load_model
    from fints.prompts import PromptTemplate
    from fints.recording import SiteMeans, record_means
    from fints.retrieval import Retrieved, retrieve_and_aggregate
    from fints.sites import Component, Site, default_sites, parse_sites
    from fints.steering import SteeringConfig, SteeringVector
    from fints.store import Store
    from fints.user_vectors import user_vector


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fints' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
