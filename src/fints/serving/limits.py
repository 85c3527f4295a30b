"""Resource limits that keep one client from hurting the others, each refused with an
OpenAI-format error naming the limit (its ``code`` is ``<limit>_exceeded`` or says what).

* requests in progress per tenant (``max_concurrent_per_tenant``): 429
  ``concurrency_limit_exceeded`` (:class:`TenantSlots`);
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

import json
from collections.abc import Sequence
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

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{f.name} must be an integer >= 1, got {value!r}")


@dataclass
class TenantSlots:
    """Requests of each tenant in the server (waiting or running): at most ``limit`` at
    once. Used from the event loop only."""

    limit: int
    counts: dict[str, int] = field(default_factory=dict)

    def acquire(self, tenant: str) -> None:
        held = self.counts.get(tenant, 0)
        if held >= self.limit:
            raise ApiError(
                429,
                f"too many requests in progress: this tenant has {held}, the limit "
                f"max_concurrent_per_tenant is {self.limit}; retry when one has finished",
                type="rate_limit_error",
                code="concurrency_limit_exceeded",
                headers={"retry-after": "1"},
            )
        self.counts[tenant] = held + 1

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


async def _refuse(send: Send, limit: int) -> None:
    error = ApiError(
        413,
        f"the request body is larger than {limit} bytes, the limit max_request_bytes",
        code="request_too_large",
    )
    body = json.dumps(error.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
