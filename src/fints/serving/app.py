"""The FastAPI application: OpenAI-compatible generation plus per-user history.

:func:`create_app` builds a self-contained app around one
:class:`~fints.engine.Personalizer`; it keeps no module-level state, so several
apps (say, with different batch sizes) can live in one process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from fints.engine import GenerationRequest, GenerationResult, Personalizer
from fints.errors import DictionaryMismatchError, FintsError, InvalidInputError, UnknownUserError
from fints.generation import GenerationOptions
from fints.history import HistoryItem
from fints.serving.api_spec import (
    AddInteractionsRequest,
    AddInteractionsResponse,
    ApiError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    DeletedUser,
    FintsInfo,
    InteractionList,
    ModelCard,
    ModelList,
    StoredInteraction,
    Usage,
)
from fints.serving.batcher import Batcher, Delta, Done, Failed, GenerationJob, Started
from fints.serving.metrics import ServingMetrics
from fints.serving.payloads import (
    Limits,
    StopFilter,
    chat_prompt,
    check_common,
    check_model,
    check_user,
    completion_prompt,
    generation_options,
    generation_request,
    history_items,
    steering_config,
    stop_sequences,
)
from fints.serving.tenants import TenantResolver

log = logging.getLogger("fints.serving")

UnknownUserMode = Literal["unsteered", "404"]
_GenerationBody = ChatCompletionRequest | CompletionRequest


@dataclass(frozen=True)
class ServerConfig:
    """Everything the app needs besides the personalizer (which holds model and store)."""

    model_id: str | None = None  # the name clients send as "model"; None: the model's name
    limits: Limits = field(default_factory=Limits)
    max_batch_size: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 256
    unknown_user: UnknownUserMode = "unsteered"
    extract_on_write: bool = True  # extract vectors when history is added (off: store only)
    api_keys: Mapping[str, str] | None = None  # key -> tenant; None: single-tenant, no auth

    def __post_init__(self) -> None:
        if self.unknown_user not in ("unsteered", "404"):
            raise InvalidInputError(
                f"unknown_user must be 'unsteered' or '404', got {self.unknown_user!r}"
            )


@dataclass
class _Server:
    personalizer: Personalizer
    config: ServerConfig
    model_id: str
    metrics: ServingMetrics
    batcher: Batcher
    tenants: TenantResolver
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(personalizer: Personalizer, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    metrics = ServingMetrics()
    server = _Server(
        personalizer=personalizer,
        config=config,
        model_id=config.model_id or personalizer.model.name,
        metrics=metrics,
        batcher=Batcher(
            personalizer,
            metrics,
            max_batch_size=config.max_batch_size,
            max_wait_ms=config.max_wait_ms,
            max_queue=config.max_queue,
            max_prompt_tokens=config.limits.max_prompt_tokens,
        ),
        tenants=TenantResolver(config.api_keys),
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if server.tenants.single_tenant:
            log.warning(
                "no API keys: single-tenant mode (tenant 'default'), no authentication; "
                "serve on loopback only"
            )
        else:
            log.info("multi-tenant mode: %d tenant(s)", len(server.tenants.tenants))
        await server.batcher.start()
        try:
            yield
        finally:
            await server.batcher.stop()

    app = FastAPI(title="fints personalization server", version="1", lifespan=lifespan)
    app.state.fints = server
    _install_error_handlers(app)
    _install_metrics_middleware(app, metrics)
    _add_routes(app, server)
    return app


# -- errors ---------------------------------------------------------------------------------


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def engine_error(exc: BaseException) -> ApiError:
    """The API error for an exception raised by the engine or the store."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UnknownUserError):
        return ApiError(404, str(exc), type="not_found_error", param="user", code="user_not_found")
    if isinstance(exc, InvalidInputError):
        return ApiError(400, str(exc))
    if isinstance(exc, DictionaryMismatchError):
        return ApiError(409, str(exc), code="dictionary_mismatch")
    if isinstance(exc, FintsError):
        return ApiError(400, str(exc))
    log.error("internal error", exc_info=exc)
    return ApiError(500, f"internal server error ({type(exc).__name__})", type="server_error")


def _param(loc: tuple[Any, ...]) -> str | None:
    parts = [p for p in loc if p != "body"]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or None


def _validation_error(exc: RequestValidationError) -> ApiError:
    errors = list(exc.errors())
    first: dict[str, Any] = dict(errors[0]) if errors else {"msg": "invalid request"}
    param = _param(tuple(first.get("loc", ())))
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = dict(first.get("ctx") or {}).get("error", "")
        return ApiError(
            400, f"the request body is not valid JSON: {detail}".rstrip(": "), code="invalid_json"
        )
    if kind == "extra_forbidden":
        return ApiError(
            400,
            f"Unrecognized request argument supplied: {param}",
            param=param,
            code="unknown_parameter",
        )
    if kind == "missing":
        return ApiError(400, f"missing required parameter: {param}", param=param, code="missing")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return ApiError(400, f"{param}: {first.get('msg')}{more}", param=param, code="invalid_value")


def _install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(_request: Request, exc: Exception) -> Response:
        return _error_response(engine_error(exc))

    async def on_validation(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return _error_response(_validation_error(exc))

    async def on_http(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            error = ApiError(404, f"unknown path: {exc.detail}", type="not_found_error")
        else:
            error = ApiError(exc.status_code, str(exc.detail))
        return _error_response(error)

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(FintsError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_api_error)


def _install_metrics_middleware(app: FastAPI, metrics: ServingMetrics) -> None:
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


# -- helpers --------------------------------------------------------------------------------


def _info(result: GenerationResult, batch_size: int) -> FintsInfo:
    return FintsInfo(
        user=result.user,
        steered=result.steered,
        note=result.note,
        retrieved=list(result.retrieved),
        weights=[float(w) for w in result.weights],
        batch_size=batch_size,
    )


def _steer_headers(result: GenerationResult) -> dict[str, str]:
    headers = {"x-fints-steered": "true" if result.steered else "false"}
    if not result.steered and result.note:
        headers["x-fints-reason"] = result.note.encode("ascii", "replace").decode()
    return headers


def _usage(result: GenerationResult) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
    )


def _sse(model: BaseModel | dict[str, Any]) -> str:
    data = model if isinstance(model, dict) else model.model_dump(exclude_none=True)
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _await_job(job: GenerationJob) -> tuple[GenerationResult, int]:
    try:
        return await job.result()
    except asyncio.CancelledError:
        job.abandoned = True
        raise
    except Exception as exc:
        raise engine_error(exc) from None


async def _await_start(job: GenerationJob) -> Started:
    try:
        event = await job.next_event()
    except asyncio.CancelledError:
        job.abandoned = True
        raise
    if isinstance(event, Failed):
        raise engine_error(event.error)
    assert isinstance(event, Started)
    return event


class _Head(TypedDict):
    """The fields that every response object and stream chunk of one request repeats."""

    id: str
    created: int
    model: str


@dataclass(frozen=True)
class _Shape:
    """What one generation endpoint's answers look like; everything else they share.

    ``chunk(head, text delta, finish reason, first chunk?, fints info)`` builds one
    stream chunk, ``usage_chunk(head, usage)`` the closing usage-only chunk, and
    ``response(head, text, finish reason, usage, fints info)`` the non-streamed body.
    """

    id_prefix: str
    chunk: Callable[[_Head, str | None, str | None, bool, FintsInfo | None], BaseModel]
    usage_chunk: Callable[[_Head, Usage], BaseModel]
    response: Callable[[_Head, str, str, Usage, FintsInfo], BaseModel]


def _chat_chunk(
    head: _Head, text: str | None, finish: str | None, first: bool, info: FintsInfo | None
) -> BaseModel:
    delta = ChatDelta(role="assistant", content="") if first else ChatDelta(content=text)
    choice = ChatChunkChoice(delta=delta, finish_reason=finish)
    return ChatCompletionChunk(**head, choices=[choice], fints=info)


def _chat_usage_chunk(head: _Head, usage: Usage) -> BaseModel:
    return ChatCompletionChunk(**head, choices=[], usage=usage)


def _chat_response(head: _Head, text: str, finish: str, usage: Usage, info: FintsInfo) -> BaseModel:
    choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finish)
    return ChatCompletion(**head, choices=[choice], usage=usage, fints=info)


def _completion_chunk(
    head: _Head, text: str | None, finish: str | None, first: bool, info: FintsInfo | None
) -> BaseModel:
    choice = CompletionChoice(text=text or "", finish_reason=finish)
    return Completion(**head, choices=[choice], fints=info)


def _completion_usage_chunk(head: _Head, usage: Usage) -> BaseModel:
    return Completion(**head, choices=[], usage=usage)


def _completion_response(
    head: _Head, text: str, finish: str, usage: Usage, info: FintsInfo
) -> BaseModel:
    choice = CompletionChoice(text=text, finish_reason=finish)
    return Completion(**head, choices=[choice], usage=usage, fints=info)


_CHAT = _Shape("chatcmpl-", _chat_chunk, _chat_usage_chunk, _chat_response)
_COMPLETION = _Shape("cmpl-", _completion_chunk, _completion_usage_chunk, _completion_response)


def _stream(
    job: GenerationJob,
    started: Started,
    shape: _Shape,
    head: _Head,
    include_usage: bool,
) -> StreamingResponse:
    def chunk(text: str | None, finish: str | None, first: bool, info: FintsInfo | None) -> str:
        return _sse(shape.chunk(head, text, finish, first, info))

    async def events() -> AsyncIterator[str]:
        yield chunk(None, None, True, _info(started.result, started.batch_size))
        stop = StopFilter(job.request.stop)
        while True:
            event = await job.next_event()
            if isinstance(event, Delta):
                text = stop.feed(event.text)
                if text:
                    yield chunk(text, None, False, None)
            elif isinstance(event, Done):
                text = stop.flush()
                if text:
                    yield chunk(text, None, False, None)
                finish = "stop" if stop.stopped else event.result.finish_reason
                yield chunk(None, finish, False, _info(event.result, event.batch_size))
                if include_usage:
                    yield _sse(shape.usage_chunk(head, _usage(event.result)))
                break
            elif isinstance(event, Failed):
                yield _sse(engine_error(event.error).body())
                break
        yield "data: [DONE]\n\n"

    headers = {**_steer_headers(started.result), "cache-control": "no-cache"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


async def _respond(
    batcher: Batcher,
    body: _GenerationBody,
    request: GenerationRequest,
    options: GenerationOptions,
    shape: _Shape,
) -> Response:
    """Run one checked generation request and answer it in ``shape``.

    Streamed: an SSE response that starts once the job is admitted. Otherwise: the
    whole text (decoding ended at the first stop sequence) as one JSON body.
    """
    job = batcher.submit(request, options, stream=body.stream)
    cid = f"{shape.id_prefix}{uuid.uuid4().hex}"
    head = _Head(id=cid, created=int(time.time()), model=body.model)
    if body.stream:
        started = await _await_start(job)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(job, started, shape, head, include_usage)

    result, size = await _await_job(job)
    response = shape.response(
        head, result.text, result.finish_reason, _usage(result), _info(result, size)
    )
    return JSONResponse(response.model_dump(), headers=_steer_headers(result))


# -- routes ---------------------------------------------------------------------------------


def _add_routes(app: FastAPI, server: _Server) -> None:
    p = server.personalizer
    config = server.config
    limits = config.limits
    served = sorted({server.model_id, p.model.name})

    def tenant_of(
        authorization: str | None = Header(default=None),
        x_fints_tenant: str | None = Header(default=None),
    ) -> str:
        return server.tenants.resolve(authorization, x_fints_tenant)

    async def request_for(
        tenant: str, user: str | None, text: str, raw: bool, body: Any, param: str
    ) -> GenerationRequest:
        stops = stop_sequences(body.stop)
        steering = steering_config(p.steering, body.fints, p.model.num_layers)
        if user is not None:
            check_user(user)
            if config.unknown_user == "404" and not await run_in_threadpool(
                p.store.has_user, tenant, user
            ):
                raise ApiError(
                    404,
                    f"unknown user {user!r}: no history was added for this user",
                    type="not_found_error",
                    param="user",
                    code="user_not_found",
                )
        return generation_request(
            user=user,
            tenant=tenant,
            text=text,
            raw=raw,
            steering=steering,
            stops=stops,
            limits=limits,
            param=param,
        )

    def checked(body: _GenerationBody) -> GenerationOptions:
        """The checks both generation endpoints start with; returns the options."""
        check_model(body.model, served)
        check_common(body)
        return generation_options(body, limits)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = server.batcher.running
        return JSONResponse(
            {
                "status": "ok" if ok else "unavailable",
                "model": server.model_id,
                "tenancy": "single-tenant" if server.tenants.single_tenant else "multi-tenant",
                "queue_depth": server.batcher.depth,
                "max_batch_size": config.max_batch_size,
            },
            status_code=200 if ok else 503,
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models(_tenant: str = Depends(tenant_of)) -> ModelList:
        return ModelList(data=[ModelCard(id=m, created=server.created) for m in served])

    @app.get("/v1/models/{model:path}")
    async def model(model: str, _tenant: str = Depends(tenant_of)) -> ModelCard:
        check_model(model, served)
        return ModelCard(id=model, created=server.created)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, tenant: str = Depends(tenant_of)) -> Response:
        options = checked(body)
        text, raw = chat_prompt(body.messages, p.model.tokenizer, p.template)
        request = await request_for(tenant, body.user, text, raw, body, "messages")
        return await _respond(server.batcher, body, request, options, _CHAT)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, tenant: str = Depends(tenant_of)) -> Response:
        options = checked(body)
        text = completion_prompt(body.prompt)
        request = await request_for(tenant, body.user, text, True, body, "prompt")
        return await _respond(server.batcher, body, request, options, _COMPLETION)

    @app.post("/v1/users/{user}/interactions")
    async def add_interactions(
        user: str, body: AddInteractionsRequest, tenant: str = Depends(tenant_of)
    ) -> AddInteractionsResponse:
        check_user(user)
        items = history_items(body.items, limits)
        extract = config.extract_on_write

        def write() -> list[str]:
            began = time.perf_counter()
            try:
                return p.add_history(user, items, tenant=tenant, build=extract)
            finally:
                server.metrics.extraction_seconds.observe(time.perf_counter() - began)

        try:
            ids = await server.batcher.run_exclusive(write)
        except Exception as exc:
            raise engine_error(exc) from None
        server.metrics.interactions_added.inc(len(ids))
        return AddInteractionsResponse(user=user, added=len(ids), ids=ids, extracted=extract)

    @app.get("/v1/users/{user}/interactions")
    async def list_interactions(user: str, tenant: str = Depends(tenant_of)) -> InteractionList:
        check_user(user)

        def read() -> tuple[list[HistoryItem], set[str]]:
            items = p.store.items(tenant, user)
            pending = p.store.items_without_entries(tenant, user, p.model.fingerprint)
            return items, {i.item_id for i in pending}

        try:
            items, pending = await run_in_threadpool(read)
        except Exception as exc:
            raise engine_error(exc) from None
        return InteractionList(
            user=user,
            data=[
                StoredInteraction(
                    id=i.item_id, input=i.input, output=i.output, extracted=i.item_id not in pending
                )
                for i in items
            ],
        )

    @app.delete("/v1/users/{user}")
    async def delete_user(user: str, tenant: str = Depends(tenant_of)) -> DeletedUser:
        check_user(user)
        try:
            await server.batcher.run_exclusive(lambda: p.delete_user(user, tenant=tenant))
        except Exception as exc:
            raise engine_error(exc) from None
        server.metrics.users_deleted.inc()
        return DeletedUser(user=user)
