"""Faults (issue 25): a store writer killed with SIGKILL at random moments loses no
acknowledged item or entry and leaves no corrupt user (a few rounds of
``benchmarks/chaos.py``, which runs >= 100 of them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.chaos import run_chaos

pytestmark = pytest.mark.slow


def test_kill_9_of_a_writer_loses_nothing_acknowledged(tmp_path: Path) -> None:
    report = run_chaos(4, tmp_path, seed=25)
    assert report.kills == 4
    assert report.acknowledged_items > 0 and report.acknowledged_entries > 0
    assert report.lost == [] and report.corrupt == [], report.render()
