"""Extracting a user's steering dictionary from a frozen model.

Methods live in a registry (:data:`METHODS`), one module each with its typed config:

* ``context``  - :mod:`.context`, the paper's context contrast
* ``response`` - :mod:`.response`, the authors' response contrast
* ``trained``  - :mod:`.trained`, vectors optimized on the user's outputs (shared + delta);
  the default (:data:`DEFAULT_METHOD`), at its own default sites (``default_sites``)

A dictionary records the method and its settings (``DictionaryMeta.method_config``).
Adding a method is one new module that calls :func:`register`, plus its import here.
"""

from fints.extraction import context as _context  # noqa: F401  (registers "context")
from fints.extraction import response as _response  # noqa: F401  (registers "response")
from fints.extraction import trained as _trained  # noqa: F401  (registers "trained")
from fints.extraction.base import (
    METHODS,
    ExtractionJob,
    ExtractionResult,
    MethodConfig,
    MethodContext,
    Sides,
    method_config,
    method_names,
    register,
)
from fints.extraction.config import DEFAULT_METHOD, ExtractionConfig
from fints.extraction.context import ContextContrastConfig
from fints.extraction.extractor import Extractor
from fints.extraction.response import ResponseContrastConfig
from fints.extraction.trained import TrainedConfig

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "ContextContrastConfig",
    "ExtractionConfig",
    "ExtractionJob",
    "ExtractionResult",
    "Extractor",
    "MethodConfig",
    "MethodContext",
    "ResponseContrastConfig",
    "Sides",
    "TrainedConfig",
    "method_config",
    "method_names",
    "register",
]
