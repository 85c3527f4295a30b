"""A bounded load benchmark of the server, over real HTTP on loopback.

N clients (one distinct user each) send M chat requests each, all at once.
Three phases on the same load: batched and steered, batched and unsteered
(``fints.enabled = false``), and steered one request at a time (a server with
``max_batch_size=1``). The report gives p50/p99 latency, throughput and errors
per phase, the batching speed-up and the cost of steering.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from fints.engine import Personalizer
from fints.errors import FintsError
from fints.serving.app import ServerConfig, create_app

TOPICS = [
    "cats",
    "the sea",
    "bread",
    "rain",
    "books",
    "music",
    "trains",
    "gardens",
    "coffee",
    "mountains",
    "winter",
    "markets",
]
STYLES = [
    lambda t: f"Arr matey! {t} be a fine treasure, savvy? Yo ho ho, ye landlubber!",
    lambda t: f"Dear reader, {t} merit careful and courteous consideration. Yours faithfully.",
    lambda t: f"{t}. Good. Done.",
    lambda t: f"OMG {t} are SO amazing!!! Totally love love love {t}!!!",
    lambda t: f"Softly, {t} drift through the quiet evening, a verse of gentle light.",
    lambda t: f"Per the analysis, {t} exhibit three measurable properties; see table 2.",
    lambda t: f"Yo, {t}? Straight fire, no cap, fam.",
    lambda t: f"In my grandmother's day, {t} were simpler, and we were grateful for them.",
]
QUERIES = [
    "Tell me about dogs.",
    "What makes a good breakfast?",
    "Describe a thunderstorm.",
    "How do I learn to paint?",
    "What is your favourite season?",
    "Tell me about the moon.",
    "Why do people travel?",
    "Describe a busy city street.",
    "What is a good hobby?",
    "Tell me about friendship.",
    "How should I spend a rainy day?",
    "Describe the ocean.",
]


@dataclass(frozen=True)
class LoadSpec:
    clients: int = 8
    requests: int = 4
    max_tokens: int = 32
    items_per_user: int = 3
    rounds: int = 1  # each phase runs this often (steered/unsteered alternate their order)
    timeout_s: float = 600.0
    user_prefix: str = "loadtest-user"

    def __post_init__(self) -> None:
        if not 1 <= self.clients <= 256 or not 1 <= self.requests <= 1000:
            raise FintsError("loadtest needs 1..256 clients and 1..1000 requests per client")
        if not 1 <= self.rounds <= 10:
            raise FintsError("loadtest needs 1..10 rounds")
        if not 1 <= self.max_tokens <= 4096 or not 1 <= self.items_per_user <= len(TOPICS):
            raise FintsError(
                f"loadtest needs max_tokens in 1..4096 and items_per_user in 1..{len(TOPICS)}"
            )

    @property
    def users(self) -> list[str]:
        return [f"{self.user_prefix}-{c}" for c in range(self.clients)]


@dataclass
class PhaseResult:
    name: str
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


@dataclass
class LoadReport:
    spec: LoadSpec
    setup_s: float
    phases: list[PhaseResult]

    @property
    def errors(self) -> int:
        return sum(len(p.errors) for p in self.phases)

    def phase(self, name: str) -> PhaseResult | None:
        return next((p for p in self.phases if p.name == name), None)

    def render(self) -> str:
        s = self.spec
        lines = [
            f"fints loadtest: {s.clients} clients x {s.requests} requests, max_tokens "
            f"{s.max_tokens}, {s.clients} distinct users ({s.items_per_user} history items each), "
            f"{s.rounds} round(s)",
            f"setup (adding history with extraction): {self.setup_s:.1f} s",
            "",
            f"{'phase':<24}{'ok':>5}{'errors':>8}{'wall s':>9}{'p50 s':>8}{'p99 s':>8}"
            f"{'req/s':>8}{'tok/s':>8}{'batch':>7}{'steered':>9}{'cpu s':>8}",
        ]
        for p in self.phases:
            lines.append(
                f"{p.name:<24}{p.ok:>5}{len(p.errors):>8}{p.wall_s:>9.2f}"
                f"{p.percentile(0.5):>8.2f}{p.percentile(0.99):>8.2f}{p.requests_per_s:>8.2f}"
                f"{p.tokens_per_s:>8.1f}{p.mean_batch:>7.2f}{p.steered:>9}"
                + (f"{p.cpu_s:>8.1f}" if p.cpu_s is not None else f"{'-':>8}")
            )
        lines.append("")
        batched, solo = self.phase("batched, steered"), self.phase("one-at-a-time, steered")
        plain = self.phase("batched, unsteered")
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
        lines.append(f"errors: {self.errors}")
        for p in self.phases:
            lines.extend(f"  {p.name}: {e}" for e in p.errors[:5])
        return "\n".join(lines)


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


# -- running a server in-process -----------------------------------------------------------


class RunningServer:
    """A uvicorn server on an ephemeral loopback port, in a background thread."""

    def __init__(self, app: Any, host: str = "127.0.0.1", startup_timeout_s: float = 60) -> None:
        import socket

        import uvicorn

        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, 0))
        port = self._socket.getsockname()[1]
        self.url = f"http://{host}:{port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_keep_alive=30)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + startup_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise FintsError("the in-process server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self._socket.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


# -- the load -------------------------------------------------------------------------------


def _headers(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


def history_for(user_index: int, count: int) -> list[dict[str, str]]:
    style = STYLES[user_index % len(STYLES)]
    return [
        {"input": f"Tell me about {topic}.", "output": style(topic)} for topic in TOPICS[:count]
    ]


def seed_users(url: str, spec: LoadSpec, api_key: str | None = None) -> float:
    """(Re)create every load user with its history; return the seconds it took."""
    began = time.perf_counter()
    with httpx.Client(base_url=url, headers=_headers(api_key), timeout=spec.timeout_s) as client:
        for n, user in enumerate(spec.users):
            gone = client.delete(f"/v1/users/{user}")
            if gone.status_code not in (200, 404):
                raise FintsError(f"could not reset {user}: {gone.status_code} {gone.text}")
            added = client.post(
                f"/v1/users/{user}/interactions",
                json={"items": history_for(n, spec.items_per_user)},
            )
            if added.status_code != 200:
                raise FintsError(f"could not add history for {user}: {added.text}")
    return time.perf_counter() - began


def served_model(url: str, api_key: str | None = None) -> str:
    response = httpx.get(f"{url}/v1/models", headers=_headers(api_key), timeout=30)
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


def run_phase(
    url: str, spec: LoadSpec, name: str, *, steered: bool, api_key: str | None = None
) -> PhaseResult:
    """Every client sends its requests one after another; all clients start together."""
    model = served_model(url, api_key)
    start = threading.Barrier(spec.clients + 1)
    lock = threading.Lock()
    result = PhaseResult(name=name, wall_s=0.0)

    def client(index: int, user: str) -> None:
        with httpx.Client(base_url=url, headers=_headers(api_key), timeout=spec.timeout_s) as http:
            start.wait()
            for r in range(spec.requests):
                body = {
                    "model": model,
                    "user": user,
                    "messages": [{"role": "user", "content": QUERIES[(index + r) % len(QUERIES)]}],
                    "max_tokens": spec.max_tokens,
                    "fints": {"enabled": steered},
                }
                began = time.perf_counter()
                try:
                    response = http.post("/v1/chat/completions", json=body)
                except httpx.HTTPError as exc:
                    with lock:
                        result.errors.append(f"{user}: {type(exc).__name__}: {exc}")
                    continue
                elapsed = time.perf_counter() - began
                with lock:
                    if response.status_code != 200:
                        result.errors.append(f"{user}: HTTP {response.status_code} {response.text}")
                        continue
                    data = response.json()
                    result.latencies.append(elapsed)
                    result.completion_tokens += int(data["usage"]["completion_tokens"])
                    result.steered += bool(data["fints"]["steered"])
                    result.batch_sizes.append(int(data["fints"]["batch_size"]))

    threads = [
        threading.Thread(target=client, args=(n, u), daemon=True) for n, u in enumerate(spec.users)
    ]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    result.wall_s = time.perf_counter() - began
    return result


def _warm_up(url: str, spec: LoadSpec, api_key: str | None = None) -> None:
    """One short request per client, steered and not: first-call costs stay out of the figures."""
    short = replace(spec, requests=1, max_tokens=min(spec.max_tokens, 4))
    for steered in (True, False):
        run_phase(url, short, "warm-up", steered=steered, api_key=api_key)


def run_with_personalizer(
    personalizer: Personalizer,
    spec: LoadSpec,
    *,
    max_batch_size: int = 8,
    max_wait_ms: float = 100.0,
    base: ServerConfig | None = None,
) -> LoadReport:
    """All three phases, each on a fresh in-process server sharing ``personalizer``.

    The servers run one after another, so only one worker thread ever uses the model.
    """
    base = base or ServerConfig()
    limits = replace(base.limits, max_tokens=max(base.limits.max_tokens, spec.max_tokens))
    batched = replace(
        base,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        limits=limits,
        api_keys=None,
    )
    phases: list[PhaseResult] = []
    setup_s = 0.0
    for round_ in range(spec.rounds):
        app = create_app(personalizer, batched)
        with RunningServer(app) as server:
            if round_ == 0:
                setup_s = seed_users(server.url, spec)
                _warm_up(server.url, spec)
            phases += _steered_and_unsteered(server.url, spec, round_, app=app)
        app = create_app(personalizer, replace(batched, max_batch_size=1))
        with RunningServer(app) as server:
            solo = partial(run_phase, server.url, spec, "one-at-a-time, steered", steered=True)
            phases.append(_measured(app, solo))
    return LoadReport(spec, setup_s, merge_phases(phases))


def _steered_and_unsteered(
    url: str, spec: LoadSpec, round_: int, api_key: str | None = None, app: Any = None
) -> list[PhaseResult]:
    """Alternate the order by round (ABBA), so drifting machine load hits both alike."""
    order = [True, False] if round_ % 2 == 0 else [False, True]
    results = []
    for steered in order:
        name = "batched, steered" if steered else "batched, unsteered"
        phase = partial(run_phase, url, spec, name, steered=steered, api_key=api_key)
        results.append(_measured(app, phase))
    return results


def _measured(app: Any, phase: Callable[[], PhaseResult]) -> PhaseResult:
    """Run a phase; with an in-process ``app``, add CPU time and the server's time split."""
    if app is None:
        return phase()
    registry = app.state.fints.metrics.registry

    def snapshot() -> tuple[float, float, float]:
        return (
            time.process_time(),
            registry.get_sample_value("fints_steering_seconds_sum") or 0.0,
            registry.get_sample_value("fints_generation_seconds_sum") or 0.0,
        )

    before = snapshot()
    result = phase()
    after = snapshot()
    result.cpu_s, result.steering_s, result.decode_s = (
        a - b for a, b in zip(after, before, strict=True)
    )
    return result


def merge_phases(phases: list[PhaseResult]) -> list[PhaseResult]:
    """One result per phase name (rounds summed), in order of first appearance."""
    merged: dict[str, PhaseResult] = {}
    for p in phases:
        into = merged.setdefault(p.name, PhaseResult(name=p.name, wall_s=0.0))
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
    order = ["batched, steered", "batched, unsteered", "one-at-a-time, steered"]
    return sorted(merged.values(), key=lambda p: order.index(p.name) if p.name in order else 9)


@contextmanager
def _store_path(store: Path | None) -> Iterator[Path]:
    if store is not None:
        yield store
        return
    with tempfile.TemporaryDirectory(prefix="fints-loadtest-") as tmp:
        yield Path(tmp) / "loadtest.sqlite"


def run_in_process(
    spec: LoadSpec,
    *,
    max_batch_size: int = 8,
    max_wait_ms: float = 100.0,
    model: str | None = None,
    dtype: str = "auto",
    store: Path | None = None,
) -> LoadReport:
    from fints.serving.commands import build_personalizer

    with _store_path(store) as path:
        personalizer = build_personalizer(model=model, store=path, dtype=dtype)
        try:
            return run_with_personalizer(
                personalizer, spec, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms
            )
        finally:
            personalizer.store.close()


def run_external(url: str, spec: LoadSpec, *, api_key: str | None = None) -> LoadReport:
    """Steered vs unsteered against a running server (its batch size is its own)."""
    url = url.rstrip("/")
    setup_s = seed_users(url, spec, api_key)
    _warm_up(url, spec, api_key)
    phases: list[PhaseResult] = []
    for round_ in range(spec.rounds):
        phases += _steered_and_unsteered(url, spec, round_, api_key)
    return LoadReport(spec, setup_s, merge_phases(phases))


if __name__ == "__main__":  # python -m fints.serving.loadtest (same options as fints loadtest)
    import typer

    from fints.serving.commands import loadtest

    typer.run(loadtest)
