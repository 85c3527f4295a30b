"""The interleaving helper behind `fints perf` and the benchmark's latency table."""

from __future__ import annotations

from fints.perf import interleaved


def test_interleaved_warms_up_then_alternates_forward_and_backward():
    calls: list[str] = []
    fns = [lambda name=name: calls.append(name) for name in "abc"]
    timings = interleaved(fns, repeats=3)
    assert calls == list("abc" + "abc" + "cba" + "abc")
    assert len(timings) == 3 and all(t.wall >= 0 and t.cpu >= 0 for t in timings)
