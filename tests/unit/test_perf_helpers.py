"""The interleaving helper behind `fints perf` and the benchmark's latency table."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fints import perf
from fints.perf import Timing, interleaved


def test_interleaved_warms_up_then_alternates_forward_and_backward():
    calls: list[str] = []
    fns = [lambda name=name: calls.append(name) for name in "abc"]
    interleaved(fns, repeats=3)
    assert calls == list("abc" + "abc" + "cba" + "abc")


def test_interleaved_reports_each_functions_median(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock: each call of a function advances it by that function's next duration."""
    clock = {"now": 0.0}
    durations = {"a": iter([100.0, 1.0, 5.0, 2.0]), "b": iter([100.0, 7.0, 3.0, 4.0])}

    def call(name: str) -> None:
        clock["now"] += next(durations[name])

    fake_time = SimpleNamespace(perf_counter=lambda: clock["now"], process_time=lambda: 0.0)
    monkeypatch.setattr(perf, "time", fake_time)
    timings = interleaved([lambda: call("a"), lambda: call("b")], repeats=3)
    assert timings == [Timing(wall=2.0, cpu=0.0), Timing(wall=4.0, cpu=0.0)]
