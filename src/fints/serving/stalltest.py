"""Write latency and decode stall: one large history item added while another tenant
chats (``fints loadtest --write-stall``).

One client of tenant ``chat`` sends 1-token chat requests back to back; after a few
seconds a client of the empty tenant ``write`` adds one item whose input and output are
each ``item_chars`` long (the documented limit: 20,000): the tenant's first build (with
trained vectors, its shared vector is trained then); then another user of that tenant
adds one short item (it draws the large item as other-user context). The report gives
both writes' latency and the chat latency before and while the writes ran: the longest
chat while they ran, less the usual one, is the stall the writes caused.
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import typer

from fints.errors import FintsError
from fints.serving.app import ServerConfig, create_app
from fints.serving.batcher import KEEP_KV_MIB, PREFILL_TOKENS
from fints.serving.factory import build_personalizer
from fints.serving.inprocess import RunningServer

if TYPE_CHECKING:
    from fints.serving.abusetest import AbuseReport

CHAT_KEY, WRITE_KEY = "stalltest-chat-key", "stalltest-write-key"
KEYS = {CHAT_KEY: "chat", WRITE_KEY: "write"}
FILLER = "The quick brown fox jumps over the lazy dog near the quiet river bank. "


@dataclass(frozen=True)
class StallSpec:
    item_chars: int = 20_000
    before_s: float = 4.0  # chats alone before the write
    after_s: float = 2.0  # chats after the later write
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not 1 <= self.item_chars <= 20_000 or self.before_s < 0 or self.after_s < 0:
            raise FintsError("--write-stall needs 1..20000 item characters")


@dataclass
class StallReport:
    title: str
    baseline: list[float] = field(default_factory=list)  # chats that ended before the write
    during: list[float] = field(default_factory=list)  # chats that overlapped the writes
    write_s: float = 0.0
    later_write_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def stall_s(self) -> float:
        """The longest chat while the writes ran, less the median chat before them."""
        if not self.during:
            return float("nan")
        return max(self.during) - _median(self.baseline)

    def render(self) -> str:
        def row(name: str, values: list[float]) -> str:
            if not values:
                return f"{name:<30}{0:>6}{'-':>9}{'-':>9}"
            return f"{name:<30}{len(values):>6}{_median(values):>9.2f}{max(values):>9.2f}"

        return "\n".join(
            [
                self.title,
                f"write of the large item: {self.write_s:.2f} s; a later short write by "
                f"another user of its tenant: {self.later_write_s:.2f} s",
                "",
                f"{'1-token chats of tenant chat':<30}{'n':>6}{'p50 s':>9}{'max s':>9}",
                row("before the write", self.baseline),
                row("while the writes ran", self.during),
                "",
                f"decode stall (longest chat while writing - median before): {self.stall_s:.2f} s",
                f"errors: {len(self.errors)}",
                *(f"  {e}" for e in self.errors[:5]),
            ]
        )


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def _headers(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def run_write_stall(url: str, model: str, spec: StallSpec, title: str) -> StallReport:
    """The scenario against a server at ``url`` that knows :data:`KEYS`."""
    report = StallReport(title)
    timeout = spec.timeout_s
    with httpx.Client(base_url=url, headers=_headers(WRITE_KEY), timeout=timeout) as writer:
        for user in ("stall-big", "stall-later"):
            writer.delete(f"/v1/users/{user}")
    with httpx.Client(base_url=url, headers=_headers(CHAT_KEY), timeout=timeout) as chatter:
        chatter.delete("/v1/users/chatter")
        _ok(chatter.post("/v1/users/chatter/interactions", json=_items("chat", 3)))
    chats: list[tuple[float, float]] = []
    stop = threading.Event()

    def chat() -> None:
        body = {
            "model": model,
            "user": "chatter",
            "max_tokens": 1,
            "messages": [{"role": "user", "content": "Tell me about dogs."}],
        }
        with httpx.Client(base_url=url, headers=_headers(CHAT_KEY), timeout=timeout) as http:
            while not stop.is_set():
                began = time.perf_counter()
                response = http.post("/v1/chat/completions", json=body)
                if response.status_code != 200:
                    report.errors.append(f"chat: HTTP {response.status_code} {response.text}")
                chats.append((began, time.perf_counter()))

    thread = threading.Thread(target=chat, daemon=True)
    thread.start()
    time.sleep(spec.before_s)
    text = (FILLER * (spec.item_chars // len(FILLER) + 1))[: spec.item_chars]
    big = {"items": [{"id": "big", "input": text, "output": text}]}
    with httpx.Client(base_url=url, headers=_headers(WRITE_KEY), timeout=timeout) as writer:
        began = time.perf_counter()
        _ok(writer.post("/v1/users/stall-big/interactions", json=big), report)
        report.write_s = time.perf_counter() - began
        later = time.perf_counter()
        _ok(writer.post("/v1/users/stall-later/interactions", json=_items("later", 1)), report)
        ended = time.perf_counter()
        report.later_write_s = ended - later
    time.sleep(spec.after_s)
    stop.set()
    thread.join(timeout)
    for start, end in chats:
        if end < began:
            report.baseline.append(end - start)
        elif start < ended:
            report.during.append(end - start)
    return report


def _items(name: str, count: int) -> dict[str, list[dict[str, str]]]:
    return {
        "items": [
            {"input": f"Tell me about {topic}.", "output": f"{name}: {topic} are wonderful!"}
            for topic in ("cats", "rain", "bread")[:count]
        ]
    }


def _ok(response: httpx.Response, report: StallReport | None = None) -> None:
    if response.status_code == 200:
        return
    error = f"{response.request.url.path}: HTTP {response.status_code} {response.text[:200]}"
    if report is None:
        raise FintsError(error)
    report.errors.append(error)


def run_stall_in_process(
    spec: StallSpec,
    *,
    item_prompt_tokens: int | None,
    extract_chunk_items: int | None,
    model: str | None = None,
    dtype: str = "auto",
    method: str = "context",
) -> StallReport:
    """The scenario on an in-process server with :data:`KEYS` and a fresh store."""
    title = (
        f"fints loadtest --write-stall: one item of 2 x {spec.item_chars:,} characters added "
        f"while tenant chat sends 1-token chats; method {method}; item tokens per prompt: "
        f"{item_prompt_tokens or 'unbounded'}, items (or training examples) per write step: "
        f"{extract_chunk_items or 'all (one step)'}"
    )
    with tempfile.TemporaryDirectory(prefix="fints-stalltest-") as tmp:
        personalizer = build_personalizer(
            model=model,
            store=Path(tmp) / "stall.sqlite",
            dtype=dtype,
            item_prompt_tokens=item_prompt_tokens,
            method=method,
        )
        config = ServerConfig(
            api_keys=KEYS, extract_chunk_items=extract_chunk_items, max_wait_ms=5.0
        )
        try:
            with RunningServer(create_app(personalizer, config)) as server:
                model_id = str(
                    httpx.get(
                        f"{server.url}/v1/models", headers=_headers(CHAT_KEY), timeout=60
                    ).json()["data"][0]["id"]
                )
                return run_write_stall(server.url, model_id, spec, title)
        finally:
            personalizer.store.close()


@dataclass(frozen=True)
class AbuseSettings:
    """The server settings ``--scenario abusive`` runs with (see :class:`AbuseSpec`)."""

    slice_tokens: int | None
    refusal_delay_ms: int
    abuser_process: bool
    rounds: int = 1
    engine: str = "transformers"
    keep_kv_mib: int = KEEP_KV_MIB
    prefill_tokens: int | None = PREFILL_TOKENS
    abusive_prompt_chars: int = 1200


def scenario_command(
    scenario: str,
    item_prompt_tokens: int,
    extract_chunk_items: int,
    *,
    model: str | None,
    dtype: str,
    abuse: AbuseSettings | None = None,
    method: str = "context",
) -> int:
    """``fints loadtest --scenario write-stall|abusive``: print the report; the exit status
    (0: no errors). 0 for either write-stall setting means no bound (as before issue 25)."""
    from fints.serving.abusetest import AbuseSpec, run_abuse_in_process

    report: StallReport | AbuseReport
    try:
        if scenario == "write-stall":
            report = run_stall_in_process(
                StallSpec(),
                item_prompt_tokens=item_prompt_tokens or None,
                extract_chunk_items=extract_chunk_items or None,
                model=model,
                dtype=dtype,
                method=method,
            )
        elif scenario == "abusive":
            spec = AbuseSpec() if abuse is None else AbuseSpec(**asdict(abuse))
            report = run_abuse_in_process(spec, model=model, dtype=dtype)
        else:
            raise FintsError(f"--scenario must be load, write-stall or abusive, got {scenario!r}")
    except FintsError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    typer.echo(report.render())
    return 1 if report.errors else 0
