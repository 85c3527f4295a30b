"""The FastAPI application: OpenAI-compatible generation plus per-user history.

:func:`create_app` builds a self-contained app around one
:class:`~fints.engine.Personalizer`; it keeps no module-level state, so several
apps (say, with different batch sizes) can live in one process. The handlers
are in :mod:`fints.serving.routes`, the error format in
:mod:`fints.serving.api_errors`, the response bodies in :mod:`fints.serving.responses`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel

from fints.engine import Personalizer
from fints.errors import InvalidInputError
from fints.serving import api_spec
from fints.serving.api_errors import install_error_handlers
from fints.serving.batcher import Batcher
from fints.serving.engines import ENGINES
from fints.serving.limits import BodyLimit, TenantGate, TenantSlots
from fints.serving.metrics import ServingMetrics
from fints.serving.routes import router
from fints.serving.state import ServerConfig, ServerState
from fints.serving.tenants import TenantResolver

__all__ = ["ServerConfig", "create_app"]

log = logging.getLogger("fints.serving")


def create_app(personalizer: Personalizer, config: ServerConfig | None = None) -> FastAPI:
    """An app serving ``personalizer``; its batcher runs while the app's lifespan does."""
    config = config or ServerConfig()
    if config.engine not in ENGINES:
        raise InvalidInputError(
            f"unknown engine {config.engine!r}: expected one of {sorted(ENGINES)}", param="engine"
        )
    metrics = ServingMetrics()
    batcher = Batcher(
        personalizer,
        metrics,
        max_batch_size=config.max_batch_size,
        max_wait_ms=config.max_wait_ms,
        max_queue=config.max_queue,
        max_prompt_tokens=config.limits.max_prompt_tokens,
        slice_tokens=config.slice_tokens,
        keep_kv_bytes=config.keep_kv_mib << 20,
        prefill_tokens=config.prefill_tokens,
    )
    server = ServerState(
        personalizer=personalizer,
        config=config,
        model_id=config.model_id or personalizer.model.name,
        metrics=metrics,
        batcher=batcher,
        generation=ENGINES[config.engine](personalizer, metrics, batcher),
        tenants=TenantResolver(config.api_keys),
        slots=TenantSlots(config.resources.max_concurrent_per_tenant),
    )
    app = FastAPI(title="fints personalization server", version="1", lifespan=_lifespan)
    app.add_middleware(BodyLimit, max_bytes=config.resources.max_request_bytes)
    app.state.fints = server
    install_error_handlers(app)
    _count_requests(app, metrics)
    app.add_middleware(  # outermost: a tenant at its limit is answered before anything else
        TenantGate,
        slots=server.slots,
        tenant_of=server.tenants.resolve,
        refused=lambda path: metrics.requests.labels(route=path, status="429").inc(),
        delay_s=config.resources.refusal_delay_ms / 1000,
    )
    app.include_router(router)
    _document_statuses(app)
    return app


def _document_statuses(app: FastAPI) -> None:
    """The OpenAPI document without FastAPI's automatic 422: a request that does not match
    the schema is answered 400 (as the OpenAI API does), which each route lists."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.get("components", {}).get("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            for name, component in components.items():
                model = getattr(api_spec, name, None)
                if isinstance(model, type) and issubclass(model, BaseModel):
                    _exact_bounds(component, model.model_json_schema())
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _exact_bounds(documented: Any, exact: Any) -> None:
    """Integer bounds as pydantic wrote them: FastAPI's document holds them as floats, and
    2**64 - 1 as a float is 2**64 (walks both schemas where their shapes agree)."""
    if isinstance(documented, dict) and isinstance(exact, dict):
        for key, value in documented.items():
            if key in exact:
                if key in _BOUNDS and isinstance(exact[key], int):
                    documented[key] = exact[key]
                else:
                    _exact_bounds(value, exact[key])
    elif isinstance(documented, list) and isinstance(exact, list) and len(documented) == len(exact):
        for mine, theirs in zip(documented, exact, strict=True):
            _exact_bounds(mine, theirs)


_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    server: ServerState = app.state.fints
    if server.tenants.single_tenant:
        log.warning(
            "no API keys: single-tenant mode (tenant 'default'), no authentication; "
            "serve on loopback only"
        )
    else:
        log.info("multi-tenant mode: %d tenant(s)", len(server.tenants.tenants))
    await server.batcher.start()
    await server.generation.start()
    expiry = None
    if server.config.expire_after_s is not None:
        expiry = asyncio.create_task(_expire_periodically(server), name="fints-expiry")
    try:
        yield
    finally:
        if expiry is not None:
            expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await expiry
        await server.generation.stop()
        await server.batcher.stop()


async def _expire_periodically(server: ServerState) -> None:
    """Forget items older than ``expire_after_s`` now, then every ``expire_every_s``."""
    config = server.config
    assert config.expire_after_s is not None
    while True:
        cutoff = datetime.now(UTC) - timedelta(seconds=config.expire_after_s)
        try:
            removed = await server.batcher.run_exclusive(
                functools.partial(server.personalizer.expire, cutoff)
            )
        except Exception:
            log.exception("expiring old history items failed; retrying later")
        else:
            server.metrics.items_expired.inc(removed)
            if removed:
                log.info("expired %d history item(s) older than %s", removed, cutoff)
        await asyncio.sleep(config.expire_every_s)


def _count_requests(app: FastAPI, metrics: ServingMetrics) -> None:
    """Every request counts in ``fints_http_requests`` and ``fints_http_request_seconds``."""

    @app.middleware("http")
    async def count(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        began = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            path = getattr(route, "path", "unmatched")
            metrics.requests.labels(route=path, status=str(status)).inc()
            metrics.request_seconds.labels(route=path).observe(time.perf_counter() - began)
