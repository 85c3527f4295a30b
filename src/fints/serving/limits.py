"""Resource limits that keep one client from hurting the others, each refused with an
OpenAI-format error naming the limit (its ``code`` is ``<limit>_exceeded`` or says what).

* requests in progress per tenant (``max_concurrent_per_tenant``): 429
  ``concurrency_limit_exceeded`` (:class:`TenantSlots`; :class:`TenantGate` answers it
  before the request is parsed when the tenant is known to be at its limit);
* the request body (``max_request_bytes``): 413 ``request_too_large`` (:class:`BodyLimit`);
* tokens per history item text (``max_item_tokens``): 413 ``item_too_large``
  (:func:`check_item_tokens`);
* items per user (``max_items_per_user``): 400 ``items_per_user_exceeded`` (the store
  checks it in the write's transaction);
* the queue (``max_queue``): 503 ``queue_full`` (the batcher).

The prompt (``max_prompt_tokens``) and ``max_tokens`` limits are 400s
(``context_length_exceeded``, ``max_tokens_exceeded``); see :mod:`.payloads`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fints.errors import InvalidInputError
from fints.history import HistoryItem
from fints.serving.api_errors import ApiError


@dataclass(frozen=True)
class ResourceLimits:
    """What one client may hold of the server (``fints serve --max-...``)."""

    max_items_per_user: int = 10_000  # history items one user may have (400)
    max_item_tokens: int = 8_192  # tokens of one item's input or of its output (413)
    max_request_bytes: int = 64 * 2**20  # a request body (413)
    max_concurrent_per_tenant: int = 64  # requests of one tenant waiting or running (429)
    #: a tenant at max_concurrent_per_tenant is answered 429 after this delay (the
    #: Retry-After it is told), so a client that ignores Retry-After is answered about as
    #: often as one that honours it, instead of as fast as it can send (0: at once)
    refusal_delay_ms: int = 1000

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            least = 0 if f.name == "refusal_delay_ms" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InvalidInputError(f"{f.name} must be an integer >= {least}, got {value!r}")


@dataclass
class TenantSlots:
    """Requests of each tenant in the server (waiting or running): at most ``limit`` at
    once. Used from the event loop only."""

    limit: int
    counts: dict[str, int] = field(default_factory=dict)

    def full(self, tenant: str) -> bool:
        return self.counts.get(tenant, 0) >= self.limit

    def refusal(self, tenant: str) -> ApiError:
        return ApiError(
            429,
            f"too many requests in progress: this tenant has {self.counts.get(tenant, 0)}, "
            f"the limit max_concurrent_per_tenant is {self.limit}; retry when one has finished",
            type="rate_limit_error",
            code="concurrency_limit_exceeded",
            headers={"retry-after": "1"},
        )

    def acquire(self, tenant: str) -> None:
        if self.full(tenant):
            raise self.refusal(tenant)
        self.counts[tenant] = self.counts.get(tenant, 0) + 1

    def release(self, tenant: str) -> None:
        held = self.counts.get(tenant, 0) - 1
        if held > 0:
            self.counts[tenant] = held
        else:
            self.counts.pop(tenant, None)


def check_item_tokens(tokenizer: Any, items: Sequence[HistoryItem], limit: int) -> None:
    """Refuse (413) an item whose input or output is longer than ``limit`` tokens."""
    for n, item in enumerate(items):
        for name in ("input", "output"):
            text = getattr(item, name)
            if len(text.encode("utf-8")) <= limit:  # no more tokens than bytes
                continue
            count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if count > limit:
                raise ApiError(
                    413,
                    f"items[{n}].{name} is {count} tokens long; the limit max_item_tokens "
                    f"is {limit}",
                    param=f"items[{n}].{name}",
                    code="item_too_large",
                )


class _TooLarge(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413, f"the request body is larger than {limit} bytes, the limit max_request_bytes"
        )


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is refused with 413 (by its
    Content-Length before it is read, or while it is read when it has none)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1").strip()
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _refuse(send, self.max_bytes)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge(self.max_bytes)
            return message

        await self.app(scope, counted, send)


#: The routes that take a slot of the tenant (generation).
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


class TenantGate:
    """ASGI middleware: a generation request of a tenant that holds all its slots is
    answered 429 at once, before its body is parsed and its prompt built (what the route
    would answer, for a fraction of the work), so a client that ignores Retry-After takes
    little from the event loop and the model thread. The route's
    :meth:`TenantSlots.acquire` stays the check that counts; ``tenant_of(authorization,
    x-fints-tenant)`` resolves the tenant as the route does (an error: left to the route).
    The answer waits ``delay_s`` first (a coroutine asleep, no work): a client that sends
    again at once is answered no faster than one that honours Retry-After.
    ``refused(path)`` is called for each request answered here (to count it)."""

    def __init__(
        self,
        app: ASGIApp,
        slots: TenantSlots,
        tenant_of: Callable[[str | None, str | None], str],
        refused: Callable[[str], None] = lambda path: None,
        delay_s: float = 0.0,
    ) -> None:
        self.app = app
        self.slots = slots
        self.tenant_of = tenant_of
        self.refused = refused
        self.delay_s = delay_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tenant = self._full_tenant(scope)
        if tenant is None:
            await self.app(scope, receive, send)
            return
        message: Message = {"more_body": True}
        while message.get("more_body", False):  # read the body: the connection stays usable
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        await _send_error(send, self.slots.refusal(tenant))
        self.refused(scope["path"])

    def _full_tenant(self, scope: Scope) -> str | None:
        if (
            scope["type"] != "http"
            or not self.slots.counts
            or scope.get("method") != "POST"
            or scope.get("path") not in GENERATION_PATHS
        ):
            return None
        headers = dict(scope.get("headers") or [])
        auth, asked = headers.get(b"authorization"), headers.get(b"x-fints-tenant")
        try:
            tenant = self.tenant_of(
                auth.decode("latin-1") if auth is not None else None,
                asked.decode("latin-1") if asked is not None else None,
            )
        except Exception:  # no key, a bad key, another tenant named: the route answers
            return None
        return tenant if self.slots.full(tenant) else None


async def _refuse(send: Send, limit: int) -> None:
    error = ApiError(
        413,
        f"the request body is larger than {limit} bytes, the limit max_request_bytes",
        code="request_too_large",
    )
    await _send_error(send, error, close=True)


async def _send_error(send: Send, error: ApiError, *, close: bool = False) -> None:
    body = json.dumps(error.body()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.encode("latin-1"), v.encode("latin-1")) for k, v in (error.headers or {}).items()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
