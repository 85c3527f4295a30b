"""Latency of benchmark methods, measured so that rows can be compared.

Per-row timings of a long run are taken minutes apart, at whatever load the
machine had then. Here every method generates the same batch of test queries
with the same number of new tokens (end of turn ignored), in ABBA order,
repeated; medians of wall-clock and process CPU time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from fints.benchmark.banks import BenchContext
from fints.benchmark.labels import Split
from fints.benchmark.methods import MethodSpec, make_method
from fints.generation import GenerationOptions
from fints.perf import interleaved


@dataclass(frozen=True)
class MethodLatency:
    label: str
    queries: int
    new_tokens: int  # per query
    wall_per_query: float  # seconds, at the batch size below
    cpu_per_query: float  # process CPU seconds (all threads)
    tokens_per_second: float  # generated tokens per wall second
    cpu_vs_first: float  # CPU time relative to the first method (normally "none")


def measure_latency(
    ctx: BenchContext,
    specs: Sequence[MethodSpec],
    options: GenerationOptions,
    *,
    batch_size: int = 16,
    repeats: int = 2,
) -> list[MethodLatency]:
    """Time ``specs`` on the first ``batch_size`` test queries, interleaved."""
    queries = ctx.task.queries(Split.TEST)[:batch_size]
    if not queries or not specs or repeats < 1:
        return []
    fixed = replace(options, ignore_eos=True)
    methods = [make_method(spec) for spec in specs]
    calls = [lambda m=m: m.generate(queries, ctx, fixed) for m in methods]
    timings = interleaved(calls, repeats)
    n, tokens = len(queries), fixed.max_new_tokens
    return [
        MethodLatency(
            label=spec.label,
            queries=n,
            new_tokens=tokens,
            wall_per_query=t.wall / n,
            cpu_per_query=t.cpu / n,
            tokens_per_second=n * tokens / t.wall,
            cpu_vs_first=t.cpu / timings[0].cpu,
        )
        for spec, t in zip(specs, timings, strict=True)
    ]
