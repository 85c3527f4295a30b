"""fints: inference-time personalization of open-weight LLMs with steering vectors.

The public API is importable from the top level; each name is loaded on first use,
so ``import fints.sites`` does not pull in torch-heavy modules it does not need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Component": "fints.sites",
    "Site": "fints.sites",
    "parse_sites": "fints.sites",
    "LayerPaths": "fints.layers",
    "resolve_layout": "fints.layers",
    "steer": "fints.injection",
    "record_means": "fints.recording",
    "SteeringConfig": "fints.steering",
    "SteeringVector": "fints.steering",
    "HistoryItem": "fints.history",
    "read_history": "fints.history",
    "DictionaryEntry": "fints.dictionary",
    "DictionaryMeta": "fints.dictionary",
    "UserDictionary": "fints.dictionary",
    "ExtractionConfig": "fints.extraction",
    "Extractor": "fints.extraction",
    "user_vector": "fints.user_vectors",
    "retrieve_and_aggregate": "fints.retrieval",
    "Store": "fints.store",
    "load_model": "fints.models",
    "LoadedModel": "fints.models",
    "SentenceTransformerEncoder": "fints.encoders",
    "PromptTemplate": "fints.prompts",
    "GenerationOptions": "fints.generation",
    "GenerationRequest": "fints.engine",
    "GenerationResult": "fints.engine",
    "Personalizer": "fints.engine",
    "FintsError": "fints.errors",
}

__all__ = [
    "Component",
    "DictionaryEntry",
    "DictionaryMeta",
    "ExtractionConfig",
    "Extractor",
    "FintsError",
    "GenerationOptions",
    "GenerationRequest",
    "GenerationResult",
    "HistoryItem",
    "LayerPaths",
    "LoadedModel",
    "Personalizer",
    "PromptTemplate",
    "SentenceTransformerEncoder",
    "Site",
    "SteeringConfig",
    "SteeringVector",
    "Store",
    "UserDictionary",
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
    from fints.encoders import SentenceTransformerEncoder
    from fints.engine import GenerationRequest, GenerationResult, Personalizer
    from fints.errors import FintsError
    from fints.extraction import ExtractionConfig, Extractor
    from fints.generation import GenerationOptions
    from fints.history import HistoryItem, read_history
    from fints.injection import steer
    from fints.layers import LayerPaths, resolve_layout
    from fints.models import LoadedModel, load_model
    from fints.prompts import PromptTemplate
    from fints.recording import record_means
    from fints.retrieval import retrieve_and_aggregate
    from fints.sites import Component, Site, parse_sites
    from fints.steering import SteeringConfig, SteeringVector
    from fints.store import Store
    from fints.user_vectors import user_vector


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fints' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
