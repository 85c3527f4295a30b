"""One abusive client against well-behaved ones (``fints loadtest --scenario abusive``).

Normal clients (a tenant each, one request in flight) send short chat requests back to
back; the p99 of their latency is measured twice on the same server: alone, and while a
client of tenant ``abuse`` keeps more requests in flight than its tenant may have
(``max_concurrent_per_tenant``), each at the limits (``max_tokens`` and a long prompt).
The report gives both p99s, their ratio (the issue's target: <= 2x) and how the
abusive requests were answered (200 or 429).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from fints.errors import FintsError
from fints.serving import abuser as abuser_module
from fints.serving.abuser import abuse
from fints.serving.app import ServerConfig, create_app
from fints.serving.batcher import KEEP_KV_MIB, PREFILL_TOKENS, SLICE_TOKENS
from fints.serving.factory import build_personalizer
from fints.serving.inprocess import RunningServer
from fints.serving.limits import ResourceLimits
from fints.serving.payloads import Limits

ABUSE_KEY = "abusetest-abuse-key"
MAX_CLIENTS = 64
#: every normal client is a tenant of its own (one request in flight: well-behaved)
KEYS = {ABUSE_KEY: "abuse", **{f"abusetest-normal-{n}": f"normal-{n}" for n in range(MAX_CLIENTS)}}


@dataclass(frozen=True)
class AbuseSpec:
    clients: int = 4  # normal clients
    requests: int = 6  # per normal client and phase
    rounds: int = 1  # of both phases (ABBA order), pooled
    max_tokens: int = 16  # of a normal request
    abusive_threads: int = 6  # requests the abuser keeps in flight (over its limit)
    limit_concurrent: int = 2  # max_concurrent_per_tenant
    limit_tokens: int = 64  # the server's max_tokens (what the abuser asks for)
    abusive_prompt_chars: int = 1200
    #: the abuser runs in a process of its own (as a real client does); False: in threads of
    #: the server's process, as before (its HTTP client then competes for the interpreter)
    abuser_process: bool = True
    #: the server's scheduling and refusal settings (ServerConfig.slice_tokens, None: rows
    #: decode whole; ResourceLimits.refusal_delay_ms)
    slice_tokens: int | None = SLICE_TOKENS
    refusal_delay_ms: int = ResourceLimits().refusal_delay_ms
    engine: str = "transformers"  # what decodes (ServerConfig.engine)
    keep_kv_mib: int = KEEP_KV_MIB  # ServerConfig.keep_kv_mib (0: sliced rows recompute)
    prefill_tokens: int | None = PREFILL_TOKENS  # ServerConfig.prefill_tokens

    def __post_init__(self) -> None:
        if not 1 <= self.clients <= MAX_CLIENTS:
            raise FintsError(f"the abusive scenario takes 1..{MAX_CLIENTS} normal clients")


@dataclass
class AbuseReport:
    title: str
    alone: list[float] = field(default_factory=list)
    with_abuse: list[float] = field(default_factory=list)
    abusive: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    def render(self) -> str:
        p_alone, p_abuse = _p99(self.alone), _p99(self.with_abuse)
        answered = ", ".join(f"{s}: {n}" for s, n in sorted(self.abusive.items()))
        return "\n".join(
            [
                self.title,
                f"normal clients alone:          n={len(self.alone)}  p50 "
                f"{_p(self.alone, 0.5):.2f} s  p99 {p_alone:.2f} s",
                f"with the abusive client:       n={len(self.with_abuse)}  p50 "
                f"{_p(self.with_abuse, 0.5):.2f} s  p99 {p_abuse:.2f} s",
                f"p99 ratio: {p_abuse / p_alone:.2f}x (target <= 2x); p50 ratio "
                f"{_p(self.with_abuse, 0.5) / _p(self.alone, 0.5):.2f}x; abusive requests "
                f"answered {answered}",
                f"errors of normal clients: {len(self.errors)}",
                *(f"  {e}" for e in self.errors[:5]),
            ]
        )


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def _p99(values: list[float]) -> float:
    return _p(values, 0.99)


def _headers(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _normal_phase(url: str, model: str, spec: AbuseSpec, report: AbuseReport) -> list[float]:
    latencies: list[float] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        key = f"abusetest-normal-{n}"
        with httpx.Client(base_url=url, headers=_headers(key), timeout=600) as http:
            for r in range(spec.requests):
                body = {
                    "model": model,
                    "user": f"normal-{n}",
                    "max_tokens": spec.max_tokens,
                    "messages": [{"role": "user", "content": f"Tell me about topic {r}."}],
                }
                began = time.perf_counter()
                response = http.post("/v1/chat/completions", json=body)
                with lock:
                    if response.status_code == 200:
                        latencies.append(time.perf_counter() - began)
                    else:
                        report.errors.append(f"HTTP {response.status_code} {response.text[:200]}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(spec.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def run_abuse(url: str, model: str, spec: AbuseSpec, title: str) -> AbuseReport:
    report = AbuseReport(title)
    _normal_phase(url, model, replace(spec, requests=1), report)  # warm-up
    report.errors.clear()
    story = "Tell me a long story about the sea. "
    prompt = (story * (spec.abusive_prompt_chars // len(story) + 1))[: spec.abusive_prompt_chars]
    config = {
        "url": url,
        "key": ABUSE_KEY,
        "threads": spec.abusive_threads,
        "pause_s": 0.01,  # after a 429: a client that ignores Retry-After, nearly
        "body": {
            "model": model,
            "user": "abuser",
            "max_tokens": spec.limit_tokens,
            "messages": [{"role": "user", "content": prompt}],
        },
    }
    for round_ in range(spec.rounds):  # alone, with; with, alone; ... (a drifting load cancels)
        for abused in (False, True) if round_ % 2 == 0 else (True, False):
            if not abused:
                report.alone += _normal_phase(url, model, spec, report)
                continue
            with _abuser(config, own_process=spec.abuser_process) as answered:
                time.sleep(1.0)  # the abuser is at its limit before the normal clients start
                report.with_abuse += _normal_phase(url, model, spec, report)
            report.abusive.update(answered)  # its requests were all answered: none is left
    return report


@contextlib.contextmanager
def _abuser(config: dict[str, Any], *, own_process: bool) -> Iterator[Counter[int]]:
    """The abusive client while the block runs (in a process of its own, or in threads of
    this one); the statuses it was answered, filled in when the block ends."""
    answered: Counter[int] = Counter()
    if not own_process:
        stop = threading.Event()
        runner = threading.Thread(target=lambda: answered.update(abuse(config, stop)))
        runner.start()
        try:
            yield answered
        finally:
            stop.set()
            runner.join()
        return
    command = [sys.executable, str(Path(abuser_module.__file__)), json.dumps(config)]
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as child:
        try:
            yield answered
        finally:
            out, _ = child.communicate(input="", timeout=600)  # closing stdin stops it
            answered.update({int(k): v for k, v in json.loads(out or "{}").items()})


def run_abuse_in_process(
    spec: AbuseSpec,
    *,
    model: str | None = None,
    dtype: str = "auto",
) -> AbuseReport:
    title = (
        f"fints loadtest --scenario abusive: {spec.rounds} round(s) of {spec.clients} normal "
        f"clients x {spec.requests} "
        f"chats of {spec.max_tokens} tokens, alone and with one abusive client keeping "
        f"{spec.abusive_threads} chats of {spec.limit_tokens} tokens in flight "
        f"(max_concurrent_per_tenant {spec.limit_concurrent}), from "
        f"{'a process of its own' if spec.abuser_process else 'threads of the server process'}"
        f"; slice_tokens {spec.slice_tokens}, refusal_delay_ms {spec.refusal_delay_ms}, "
        f"keep_kv_mib {spec.keep_kv_mib}, prefill_tokens {spec.prefill_tokens}, "
        f"abuser's prompt {spec.abusive_prompt_chars} characters, engine {spec.engine}"
    )
    with tempfile.TemporaryDirectory(prefix="fints-abusetest-") as tmp:
        personalizer = build_personalizer(model=model, store=Path(tmp) / "a.sqlite", dtype=dtype)
        config = ServerConfig(
            api_keys=KEYS,
            max_wait_ms=20.0,
            slice_tokens=spec.slice_tokens,
            keep_kv_mib=spec.keep_kv_mib,
            prefill_tokens=spec.prefill_tokens,
            engine=spec.engine,
            limits=Limits(max_tokens=spec.limit_tokens, default_max_tokens=spec.max_tokens),
            resources=ResourceLimits(
                max_concurrent_per_tenant=spec.limit_concurrent,
                refusal_delay_ms=spec.refusal_delay_ms,
            ),
        )
        try:
            with RunningServer(create_app(personalizer, config)) as server:
                model_id = personalizer.model.name
                return run_abuse(server.url, model_id, spec, title)
        finally:
            personalizer.store.close()
