"""A bounded load benchmark of the server, over real HTTP on loopback.

N clients (one distinct user each) send M chat requests each, all at once.
Three phases on the same load (:class:`~fints.serving.loadreport.Phase`):
batched and steered, batched and unsteered (``fints.enabled = false``), and
steered one request at a time (a server with ``max_batch_size=1``). The report
gives p50/p99 latency, throughput and errors per phase, the batching speed-up
and the cost of steering. :func:`loadtest` is the ``fints loadtest`` command
(``python -m fints.serving.loadtest`` runs it on its own).
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from fints.engine import Personalizer
from fints.errors import FintsError
from fints.history import ITEM_PROMPT_TOKENS
from fints.serving.app import ServerConfig, create_app
from fints.serving.batcher import KEEP_KV_MIB, PREFILL_TOKENS, SLICE_TOKENS
from fints.serving.factory import build_personalizer, command_failed, set_threads
from fints.serving.inprocess import RunningServer
from fints.serving.limits import ResourceLimits
from fints.serving.loaddata import QUERIES, STYLES, TOPICS
from fints.serving.loadreport import LoadReport, Phase, PhaseResult, merge_phases
from fints.serving.stalltest import AbuseSettings, scenario_command


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

    def describe(self) -> str:
        return (
            f"fints loadtest: {self.clients} clients x {self.requests} requests, max_tokens "
            f"{self.max_tokens}, {self.clients} distinct users ({self.items_per_user} history "
            f"items each), {self.rounds} round(s)"
        )


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
    url: str, spec: LoadSpec, phase: Phase, *, steered: bool, api_key: str | None = None
) -> PhaseResult:
    """Every client sends its requests one after another; all clients start together."""
    model = served_model(url, api_key)
    start = threading.Barrier(spec.clients + 1)
    lock = threading.Lock()
    result = PhaseResult(phase=phase, wall_s=0.0)

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
        run_phase(url, short, Phase.WARM_UP, steered=steered, api_key=api_key)


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
            solo = partial(run_phase, server.url, spec, Phase.SOLO_STEERED, steered=True)
            phases.append(_measured(app, solo))
    return LoadReport(spec.describe(), setup_s, merge_phases(phases))


def _steered_and_unsteered(
    url: str, spec: LoadSpec, round_: int, api_key: str | None = None, app: Any = None
) -> list[PhaseResult]:
    """Alternate the order by round (ABBA), so drifting machine load hits both alike."""
    order = [True, False] if round_ % 2 == 0 else [False, True]
    results = []
    for steered in order:
        name = Phase.BATCHED_STEERED if steered else Phase.BATCHED_UNSTEERED
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
    with _store_path(store) as path:
        # the context contrast: seeding deletes and re-adds every user, and a tenant's
        # trained shared vector would be retrained after each deletion (minutes each)
        personalizer = build_personalizer(model=model, store=path, dtype=dtype, method="context")
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
    return LoadReport(spec.describe(), setup_s, merge_phases(phases))


# -- the command ----------------------------------------------------------------------------


def loadtest(
    clients: Annotated[int, typer.Option(help="Concurrent clients (one user each).")] = 8,
    requests: Annotated[int, typer.Option(help="Requests per client.")] = 4,
    max_tokens: Annotated[int, typer.Option(help="max_tokens of every request.")] = 32,
    items_per_user: Annotated[int, typer.Option(help="History items added per user.")] = 3,
    rounds: Annotated[
        int, typer.Option(help="Run every phase this often (results are pooled).")
    ] = 1,
    max_batch_size: Annotated[int, typer.Option(help="Batch size of the batched server.")] = 8,
    max_wait_ms: Annotated[
        float,
        typer.Option(
            help="Batching window of the in-process servers (wide: a client that is late by a "
            "few ms on a busy machine still joins the batch)."
        ),
    ] = 100.0,
    model: Annotated[str | None, typer.Option(help="Model for the in-process server.")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    store: Annotated[
        Path | None, typer.Option(help="Store for the in-process server; default: a temp file.")
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(help="Measure a running server instead (steered vs unsteered only)."),
    ] = None,
    api_key: Annotated[str | None, typer.Option(help="API key for --url.")] = None,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads for torch (default: torch's choice).")
    ] = None,
    scenario: Annotated[
        str,
        typer.Option(
            help="load (the phases above); write-stall: write latency and decode stall of one "
            "20,000-character item added while another tenant chats; abusive: normal clients' "
            "p99 alone and beside one client at its limits."
        ),
    ] = "load",
    item_prompt_tokens: Annotated[
        int, typer.Option(help="write-stall: tokens per item text in a prompt (0: all).")
    ] = ITEM_PROMPT_TOKENS,
    extract_chunk_items: Annotated[
        int,
        typer.Option(
            help="write-stall: items (trained: training examples) per write step (0: all at once)."
        ),
    ] = 1,
    method: Annotated[
        str, typer.Option(help="write-stall: the extraction method of the writes.")
    ] = "context",
    slice_tokens: Annotated[
        int, typer.Option(help="abusive: the server's slice_tokens (0: requests decode whole).")
    ] = SLICE_TOKENS,
    refusal_delay_ms: Annotated[
        int, typer.Option(help="abusive: how long a 429 for the concurrency limit waits.")
    ] = ResourceLimits().refusal_delay_ms,
    abuser_in_process: Annotated[
        bool, typer.Option(help="abusive: the abuser in threads of the server's process.")
    ] = False,
    engine: Annotated[
        str, typer.Option(help="abusive: what decodes, transformers or vllm (docs/VLLM.md).")
    ] = "transformers",
    keep_kv_mib: Annotated[
        int, typer.Option(help="abusive: KV cache kept between slices, MiB (0: none).")
    ] = KEEP_KV_MIB,
    prefill_tokens: Annotated[
        int, typer.Option(help="abusive: prompt tokens read per round (0: at once).")
    ] = PREFILL_TOKENS,
    abusive_prompt_chars: Annotated[
        int, typer.Option(help="abusive: the abuser's prompt, in characters.")
    ] = 1200,
) -> None:
    """A bounded load benchmark: latency, throughput, batching and steering cost."""
    logging.basicConfig(level="WARNING")
    logging.getLogger("fints.serving").setLevel(logging.ERROR)  # in-process servers: quiet
    set_threads(threads)
    if scenario != "load":
        raise typer.Exit(
            scenario_command(
                scenario,
                item_prompt_tokens,
                extract_chunk_items,
                model=model,
                dtype=dtype,
                abuse=AbuseSettings(
                    slice_tokens or None,
                    refusal_delay_ms,
                    not abuser_in_process,
                    rounds,
                    engine,
                    keep_kv_mib,
                    prefill_tokens or None,
                    abusive_prompt_chars,
                ),
                method=method,
            )
        )
    try:
        spec = LoadSpec(
            clients=clients,
            requests=requests,
            max_tokens=max_tokens,
            items_per_user=items_per_user,
            rounds=rounds,
        )
        if url:
            report = run_external(url, spec, api_key=api_key)
        else:
            report = run_in_process(
                spec,
                max_batch_size=max_batch_size,
                max_wait_ms=max_wait_ms,
                model=model,
                dtype=dtype,
                store=store,
            )
    except FintsError as exc:
        raise command_failed(exc) from None
    typer.echo(report.render())
    if report.errors:
        raise typer.Exit(1)


if __name__ == "__main__":  # python -m fints.serving.loadtest (the same as fints loadtest)
    typer.run(loadtest)
