"""The tenant gate (issue 25): a generation request of a tenant at its concurrency limit is
answered 429 before its body is parsed, after the refusal delay, on a connection that stays
usable; other tenants and the tenant's own requests once a slot is free go through."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import httpx
import pytest

from fints.engine import Personalizer
from fints.errors import InvalidInputError
from fints.serving import limits
from fints.serving.app import create_app
from fints.serving.limits import ResourceLimits
from fints.serving.state import ServerState
from tests.unit.test_hardening_limits import CHAT, CONFIG, RESOURCES, A, B, personalizer

__all__ = ["personalizer"]  # the module fixture, shared


def test_the_refusal_delay_may_be_zero_but_not_negative() -> None:
    assert ResourceLimits(refusal_delay_ms=0).refusal_delay_ms == 0
    with pytest.raises(InvalidInputError, match="refusal_delay_ms"):
        ResourceLimits(refusal_delay_ms=-1)


def test_a_tenant_at_its_limit_is_refused_before_its_body_is_read(
    personalizer: Personalizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float, *args: Any) -> None:
        slept.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(limits.asyncio, "sleep", sleep)
    resources = replace(RESOURCES, refusal_delay_ms=250)

    async def main() -> None:
        app = create_app(personalizer, replace(CONFIG, resources=resources))
        server: ServerState = app.state.fints
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            server.slots.counts["A"] = 1  # A holds its one slot
            # not even a valid body: the gate answers before the route parses it
            refused = await http.post("/v1/chat/completions", json={"bad": True}, headers=A)
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "concurrency_limit_exceeded"
            assert refused.headers["retry-after"] == "1"
            assert slept == [0.25]
            # another tenant, and A's other routes, are not gated
            assert (await http.post("/v1/chat/completions", json={}, headers=B)).status_code == 400
            assert (await http.get("/v1/users/u/interactions", headers=A)).status_code == 404
            # no key: the route answers (401), as it would without the gate
            assert (await http.post("/v1/completions", json={})).status_code == 401
            metrics = (await http.get("/metrics")).text
            assert 'route="/v1/chat/completions",status="429"} 1.0' in metrics
            server.slots.counts.clear()  # the slot is free again: the body is read and parsed
            bad = await http.post("/v1/chat/completions", json={"bad": True}, headers=A)
            assert bad.status_code == 400
        assert slept == [0.25]

    asyncio.run(main())


def test_a_refused_keep_alive_connection_serves_the_next_request(
    personalizer: Personalizer,
) -> None:
    """Over real HTTP: the refused request's body is read, so the next one on the same
    connection is answered."""
    from fints.serving.inprocess import RunningServer

    resources = replace(RESOURCES, refusal_delay_ms=0)
    app = create_app(personalizer, replace(CONFIG, resources=resources))
    with (
        RunningServer(app) as running,
        httpx.Client(base_url=running.url, headers=A, timeout=60) as http,
    ):
        server: ServerState = app.state.fints
        server.slots.counts["A"] = 1
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 429
        server.slots.counts.clear()
        answered = http.post("/v1/chat/completions", json=CHAT)
        assert answered.status_code == 200, answered.text
