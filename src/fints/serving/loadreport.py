"""What a load test measured: the phases, their results, and the printed report.

The phase names are :class:`Phase`; :func:`merge_phases` pools rounds, and
:meth:`LoadReport.render` prints the table and the batching and steering ratios.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from enum import StrEnum


class Phase(StrEnum):
    """The phases of a load test, in the order the report lists them."""

    BATCHED_STEERED = "batched, steered"
    BATCHED_UNSTEERED = "batched, unsteered"
    SOLO_STEERED = "one-at-a-time, steered"  # a server with max_batch_size=1
    WARM_UP = "warm-up"  # not reported


@dataclass
class PhaseResult:
    phase: Phase
    wall_s: float
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    steered: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    # in-process servers only: process CPU seconds, and the server's own time split
    cpu_s: float | None = None
    steering_s: float | None = None  # retrieval, aggregation, prompts (per batch, summed)
    decode_s: float | None = None  # generate() with the steering hooks (per batch, summed)

    @property
    def ok(self) -> int:
        return len(self.latencies)

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.wall_s if self.wall_s else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s else 0.0

    @property
    def mean_batch(self) -> float:
        return statistics.fmean(self.batch_sizes) if self.batch_sizes else 0.0

    @property
    def tokens_per_cpu_s(self) -> float | None:
        return self.completion_tokens / self.cpu_s if self.cpu_s else None


def merge_phases(phases: list[PhaseResult]) -> list[PhaseResult]:
    """One result per phase (rounds summed), in :class:`Phase` order."""
    merged: dict[Phase, PhaseResult] = {}
    for p in phases:
        into = merged.setdefault(p.phase, PhaseResult(phase=p.phase, wall_s=0.0))
        into.wall_s += p.wall_s
        into.latencies += p.latencies
        into.errors += p.errors
        into.completion_tokens += p.completion_tokens
        into.steered += p.steered
        into.batch_sizes += p.batch_sizes
        for name in ("cpu_s", "steering_s", "decode_s"):
            value = getattr(p, name)
            if value is not None:
                setattr(into, name, (getattr(into, name) or 0.0) + value)
    order = list(Phase)
    return sorted(merged.values(), key=lambda p: order.index(p.phase))


@dataclass
class LoadReport:
    title: str  # the first line: what load ran
    setup_s: float
    phases: list[PhaseResult]

    @property
    def errors(self) -> int:
        return sum(len(p.errors) for p in self.phases)

    def phase(self, phase: Phase) -> PhaseResult | None:
        return next((p for p in self.phases if p.phase == phase), None)

    def render(self) -> str:
        lines = [
            self.title,
            f"setup (adding history with extraction): {self.setup_s:.1f} s",
            "",
            f"{'phase':<24}{'ok':>5}{'errors':>8}{'wall s':>9}{'p50 s':>8}{'p99 s':>8}"
            f"{'req/s':>8}{'tok/s':>8}{'batch':>7}{'steered':>9}{'cpu s':>8}",
        ]
        for p in self.phases:
            lines.append(
                f"{p.phase.value:<24}{p.ok:>5}{len(p.errors):>8}{p.wall_s:>9.2f}"
                f"{p.percentile(0.5):>8.2f}{p.percentile(0.99):>8.2f}{p.requests_per_s:>8.2f}"
                f"{p.tokens_per_s:>8.1f}{p.mean_batch:>7.2f}{p.steered:>9}"
                + (f"{p.cpu_s:>8.1f}" if p.cpu_s is not None else f"{'-':>8}")
            )
        lines.append("")
        lines += self._ratios()
        lines.append(f"errors: {self.errors}")
        for p in self.phases:
            lines.extend(f"  {p.phase.value}: {e}" for e in p.errors[:5])
        return "\n".join(lines)

    def _ratios(self) -> list[str]:
        """The batching speed-up and the cost of steering, where the phases allow."""
        lines = []
        batched, solo = self.phase(Phase.BATCHED_STEERED), self.phase(Phase.SOLO_STEERED)
        plain = self.phase(Phase.BATCHED_UNSTEERED)
        if batched and solo and solo.requests_per_s:
            lines.append(
                f"batching: {batched.requests_per_s / solo.requests_per_s:.2f}x the requests/s "
                f"and {_ratio(batched.tokens_per_s, solo.tokens_per_s):.2f}x the tokens/s of "
                "one-request-at-a-time serving"
            )
        if batched and plain and plain.tokens_per_s:
            ratio = batched.tokens_per_s / plain.tokens_per_s
            lines.append(
                f"steering, wall clock: steered serving runs at {ratio:.3f}x the tokens/s of "
                f"unsteered serving on the same load (cost {100 * (1 - ratio):.1f}%; target <= 5%)"
            )
            steered_cpu, plain_cpu = batched.tokens_per_cpu_s, plain.tokens_per_cpu_s
            if steered_cpu and plain_cpu:
                cpu_ratio = steered_cpu / plain_cpu
                lines.append(
                    f"steering, CPU time: {cpu_ratio:.3f}x the tokens per CPU-second "
                    f"(cost {100 * (1 - cpu_ratio):.1f}%; less sensitive to other load)"
                )
            if batched.steering_s is not None and batched.decode_s:
                share = 100 * batched.steering_s / batched.decode_s
                lines.append(
                    "steering, server side: retrieval + aggregation took "
                    f"{batched.steering_s:.2f} s = {share:.1f}% of the {batched.decode_s:.1f} s "
                    "of decoding"
                )
        return lines


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")
