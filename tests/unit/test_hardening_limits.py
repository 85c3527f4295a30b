"""Resource limits (issue 25): items per user, tokens per item, request bytes, requests in
progress per tenant and the queue, each refused with an OpenAI-format error naming the
limit, nothing stored by a refused write, and other tenants served meanwhile."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from fints.engine import Personalizer
from fints.errors import InvalidInputError, LimitExceededError
from fints.history import HistoryItem
from fints.serving.abusetest import KEYS as ABUSE_KEYS
from fints.serving.abusetest import AbuseSpec, run_abuse
from fints.serving.app import ServerConfig, create_app
from fints.serving.inprocess import RunningServer
from fints.serving.limits import ResourceLimits, TenantSlots
from fints.serving.payloads import Limits
from fints.serving.state import ServerState
from fints.store import Store
from tests.unit.benchmark_fixtures import HashEncoder, tiny_llama

KEYS = {"limits-key-a": "A", "limits-key-b": "B"}
A, B = ({"authorization": f"Bearer {k}"} for k in KEYS)
RESOURCES = ResourceLimits(
    max_items_per_user=3, max_item_tokens=20, max_request_bytes=4000, max_concurrent_per_tenant=1
)
CONFIG = ServerConfig(
    limits=Limits(max_tokens=4, default_max_tokens=1, max_prompt_tokens=128),
    resources=RESOURCES,
    api_keys=KEYS,
    extract_on_write=False,
    max_wait_ms=0,
    max_queue=2,
)
CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


@pytest.fixture(scope="module")
def personalizer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Personalizer]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    store = Store(tmp_path_factory.mktemp("limits") / "store.sqlite")
    yield Personalizer(tiny_llama(), store, encoder=HashEncoder())
    store.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(personalizer: Personalizer) -> Iterator[RunningServer]:
    with RunningServer(create_app(personalizer, CONFIG)) as running:
        yield running


def items(*texts: str) -> dict[str, Any]:
    return {"items": [{"id": t[:8], "input": t, "output": f"answer to {t}"} for t in texts]}


def assert_error(response: httpx.Response, status: int, code: str, param: str | None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error
    return str(error["message"])


def test_items_per_user_refuses_the_write_that_would_pass_it(
    server: RunningServer, personalizer: Personalizer
) -> None:
    with httpx.Client(base_url=server.url, headers=A, timeout=60) as http:
        assert http.post("/v1/users/ivy/interactions", json=items("one", "two")).status_code == 200
        refused = http.post("/v1/users/ivy/interactions", json=items("three", "four"))
        message = assert_error(refused, 400, "items_per_user_exceeded", "items")
        assert "max_items_per_user" in message and "3" in message
        assert [i.input for i in personalizer.store.items("A", "ivy")] == ["one", "two"]
        # a retry of stored items is still fine at the limit, and the last slot can be used
        assert http.post("/v1/users/ivy/interactions", json=items("one", "two")).status_code == 200
        assert http.post("/v1/users/ivy/interactions", json=items("three")).status_code == 200
        assert len(personalizer.store.items("A", "ivy")) == 3


def test_an_item_over_the_token_limit_is_a_413_and_nothing_is_stored(
    server: RunningServer, personalizer: Personalizer
) -> None:
    long = " ".join(f"word{n}" for n in range(40))  # about 80 tokens, 220 characters
    with httpx.Client(base_url=server.url, headers=A, timeout=60) as http:
        body = {"items": [{"input": "short", "output": "fine"}, {"input": "ok", "output": long}]}
        refused = http.post("/v1/users/tom/interactions", json=body)
        assert "max_item_tokens" in assert_error(refused, 413, "item_too_large", "items[1].output")
    assert "tom" not in personalizer.store.users("A")


def test_a_body_over_the_byte_limit_is_a_413_with_or_without_a_length(
    server: RunningServer,
) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    with httpx.Client(base_url=server.url, headers=A, timeout=60) as http:
        refused = http.post("/v1/chat/completions", json=big)
        assert "max_request_bytes" in assert_error(refused, 413, "request_too_large", None)

    def chunks() -> Iterator[bytes]:  # no content-length: counted while it is read
        yield b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}]}'

    with httpx.Client(base_url=server.url, headers=A, timeout=60) as http:
        headers = {"content-type": "application/json"}
        refused = http.post("/v1/chat/completions", content=chunks(), headers=headers)
        assert_error(refused, 413, "request_too_large", None)
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_limits_are_in_the_openapi_document(server: RunningServer) -> None:
    document = httpx.get(f"{server.url}/openapi.json", timeout=60).json()
    for path, method in (
        ("/v1/chat/completions", "post"),
        ("/v1/users/{user}/interactions", "post"),
    ):
        assert {"413", "429", "503"} <= set(document["paths"][path][method]["responses"])


# -- requests in progress and the queue, with the worker held by a write ----------------------


async def until(condition: Any) -> None:
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the condition never held")


def test_a_tenant_over_its_concurrent_requests_gets_429_others_are_served(
    personalizer: Personalizer,
) -> None:
    async def main() -> None:
        app = create_app(personalizer, replace(CONFIG, max_queue=8))
        server: ServerState = app.state.fints
        await server.batcher.start()
        gate = threading.Event()
        blocker = asyncio.ensure_future(server.batcher.run_exclusive(lambda: gate.wait(60)))
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                first = asyncio.ensure_future(
                    http.post("/v1/chat/completions", json=CHAT, headers=A)
                )
                await until(lambda: server.slots.counts.get("A") == 1)
                second = await http.post("/v1/chat/completions", json=CHAT, headers=A)
                message = assert_error(second, 429, "concurrency_limit_exceeded", None)
                assert "max_concurrent_per_tenant" in message
                assert second.headers["retry-after"] == "1"
                other = asyncio.ensure_future(
                    http.post("/v1/chat/completions", json=CHAT, headers=B)
                )
                await until(lambda: server.slots.counts.get("B") == 1)
                gate.set()
                assert (await first).status_code == 200
                assert (await other).status_code == 200
                await until(lambda: not server.slots.counts)
                again = await http.post("/v1/chat/completions", json=CHAT, headers=A)
                assert again.status_code == 200
        finally:
            gate.set()
            await blocker
            await server.batcher.stop()

    asyncio.run(main())


def test_a_full_queue_is_a_503_naming_the_limit(personalizer: Personalizer) -> None:
    async def main() -> None:
        app = create_app(personalizer, CONFIG)
        server: ServerState = app.state.fints
        await server.batcher.start()
        gate = threading.Event()
        blocker = asyncio.ensure_future(server.batcher.run_exclusive(lambda: gate.wait(60)))
        waiting = asyncio.ensure_future(server.batcher.run_exclusive(lambda: None))
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                await until(lambda: server.batcher.depth == 2)
                full = await http.post("/v1/chat/completions", json=CHAT, headers=B)
                assert "max_queue" in assert_error(full, 503, "queue_full", "max_queue")
                assert not server.slots.counts  # a refused request holds no slot
        finally:
            gate.set()
            await blocker
            await waiting
            await server.batcher.stop()

    asyncio.run(main())


def test_tenant_slots_count_and_release() -> None:
    slots = TenantSlots(2)
    slots.acquire("A")
    slots.acquire("A")
    slots.acquire("B")
    with pytest.raises(Exception, match="max_concurrent_per_tenant is 2"):
        slots.acquire("A")
    slots.release("A")
    slots.acquire("A")
    for tenant in ("A", "A", "B"):
        slots.release(tenant)
    assert slots.counts == {}


def test_the_store_enforces_items_per_user_in_the_write(tmp_path: Path) -> None:
    with Store(tmp_path / "s.sqlite") as store:
        store.add_items("t", "u", [HistoryItem("a", "b"), HistoryItem("c", "d")], max_items=2)
        with pytest.raises(LimitExceededError, match="max_items_per_user") as err:
            store.add_items("t", "u", [HistoryItem("e", "f")], max_items=2)
        assert err.value.limit == "max_items_per_user" and err.value.param == "items"
        assert len(store.items("t", "u")) == 2


@pytest.mark.parametrize("field", ["max_items_per_user", "max_item_tokens", "max_queue"])
def test_limits_must_be_positive(field: str) -> None:
    with pytest.raises((InvalidInputError, ValueError), match=field):
        if field == "max_queue":
            ServerConfig(max_queue=0)
        else:
            ResourceLimits(**{field: 0})


def test_the_abusive_scenario_reports_both_p99s(personalizer: Personalizer) -> None:
    """``fints loadtest --scenario abusive`` on the tiny model: the abuser over its limit
    gets 429s, the normal clients get every answer."""
    spec = AbuseSpec(clients=2, requests=2, max_tokens=2, abusive_threads=3, limit_tokens=4)
    config = ServerConfig(
        api_keys=ABUSE_KEYS,
        max_wait_ms=0,
        limits=Limits(max_tokens=4, default_max_tokens=2, max_prompt_tokens=1024),
        resources=ResourceLimits(max_concurrent_per_tenant=1),
    )
    with RunningServer(create_app(personalizer, config)) as server:
        report = run_abuse(server.url, "tiny-llama", spec, "title")
    assert report.errors == []
    assert len(report.alone) == len(report.with_abuse) == 4
    assert report.abusive[429] > 0 and report.abusive[200] > 0
    assert "p99 ratio" in report.render()
