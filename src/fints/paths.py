"""Where fints keeps its files: ``$FINTS_HOME`` or ``~/.cache/fints``."""

from __future__ import annotations

import os
from pathlib import Path


def fints_home() -> Path:
    home = Path(os.environ.get("FINTS_HOME") or Path.home() / ".cache" / "fints")
    home.mkdir(parents=True, exist_ok=True)
    return home


def default_store_path() -> Path:
    return fints_home() / "store.sqlite"


def model_cache_dir() -> Path:
    path = fints_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path
