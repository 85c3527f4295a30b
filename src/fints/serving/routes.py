"""The HTTP handlers, on one :class:`APIRouter`.

Each handler finds what it needs (personalizer, batcher, limits, metrics) on
``request.app.state.fints`` (:func:`~fints.serving.state.server_of`), so the
router holds no state and one process can serve several apps.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any
from urllib.parse import unquote_to_bytes

from fastapi import APIRouter, Depends, Header, Path, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from fints.engine import GenerationRequest, GenerationResult, UnknownUser
from fints.generation import GenerationOptions
from fints.history import HistoryItem
from fints.serving.api_errors import ApiError, api_error_for
from fints.serving.api_spec import (
    MAX_NAME_CHARS,
    NAME_PATTERN,
    AddInteractionsRequest,
    AddInteractionsResponse,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DeletedUser,
    ErrorResponse,
    InteractionList,
    ModelCard,
    ModelList,
    StoredInteraction,
)
from fints.serving.batcher import Failed, GenerationJob, Started
from fints.serving.limits import check_item_tokens
from fints.serving.payloads import (
    chat_prompt,
    check_common,
    check_model,
    check_user,
    completion_prompt,
    generation_options,
    generation_request,
    guidance_preferences,
    history_items,
    steering_config,
    stop_sequences,
)
from fints.serving.responses import CHAT, COMPLETION, Shape, json_response, stream_response
from fints.serving.state import ServerState, server_of
from fints.steps import Steps

router = APIRouter()

_GenerationBody = ChatCompletionRequest | CompletionRequest

_WHY = {
    400: "Invalid request: a malformed body or parameter (the error's param names it)",
    401: "No API key, or an invalid one",
    403: "The API key belongs to another tenant than x-fints-tenant names",
    404: "Unknown model, or unknown user",
    409: "The user's dictionary does not fit the served model",
    413: "The request body (max_request_bytes) or a history item (max_item_tokens) is too large",
    429: "The tenant has max_concurrent_per_tenant requests in progress; retry later",
    500: "Internal server error",
    503: "Overloaded (the queue is full), shutting down, or the store refuses writes "
    "(read-only, full disk) or holds damaged data; the error's code says which",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route's errors, each in the OpenAI error format."""
    return {s: {"model": ErrorResponse, "description": _WHY[s]} for s in (*statuses, 500)}


_AUTH = (401, 403)
_GENERATION = errors(400, *_AUTH, 404, 409, 413, 429, 503)
_STREAM = {"text/event-stream": {"schema": {"type": "string"}}}


def tenant_of(
    request: Request,
    authorization: str | None = Header(default=None),
    x_fints_tenant: str | None = Header(default=None),
) -> str:
    """The tenant whose data a request may see (from its API key)."""
    return server_of(request).tenants.resolve(authorization, x_fints_tenant)


def user_in_path(
    request: Request,
    user: Annotated[
        str,
        Path(
            description="the user's name: no control characters, not only whitespace",
            pattern=NAME_PATTERN,
            max_length=MAX_NAME_CHARS,
        ),
    ],
) -> str:
    """The ``{user}`` of the path, refused unless its percent-decoded bytes are UTF-8 (so
    that two different raw names never both become ``\ufffd``)."""
    raw = request.scope.get("raw_path")
    if isinstance(raw, bytes):
        try:
            unquote_to_bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(
                400,
                "the user name in the path is not valid UTF-8 once percent-decoded",
                param="user",
                code="invalid_user",
            ) from None
    return check_user(user)


# -- service --------------------------------------------------------------------------------


@router.get(
    "/health",
    responses={503: {"description": "The model worker is not running (same body, status)"}},
)
async def health(request: Request) -> JSONResponse:
    server = server_of(request)
    ok = server.batcher.running and server.generation.running
    return JSONResponse(
        {
            "status": "ok" if ok else "unavailable",
            "model": server.model_id,
            "tenancy": "single-tenant" if server.tenants.single_tenant else "multi-tenant",
            "queue_depth": server.batcher.depth + server.generation.depth,
            "max_batch_size": server.config.max_batch_size,
        },
        status_code=200 if ok else 503,
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus metrics in the text exposition format",
            "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
        },
        500: errors()[500],
    },
)
async def prometheus(request: Request) -> Response:
    body, content_type = server_of(request).metrics.render()
    return Response(body, media_type=content_type)


@router.get("/v1/models", responses=errors(*_AUTH))
async def models(request: Request, _tenant: str = Depends(tenant_of)) -> ModelList:
    server = server_of(request)
    return ModelList(data=[ModelCard(id=m, created=server.created) for m in server.served])


@router.get("/v1/models/{model:path}", responses=errors(*_AUTH, 404))
async def model(model: str, request: Request, _tenant: str = Depends(tenant_of)) -> ModelCard:
    server = server_of(request)
    check_model(model, server.served)
    return ModelCard(id=model, created=server.created)


# -- generation -----------------------------------------------------------------------------


def _checked(server: ServerState, body: _GenerationBody) -> GenerationOptions:
    """The checks both generation endpoints start with; returns the options."""
    check_model(body.model, server.served)
    check_common(body)
    return generation_options(body, server.config.limits)


async def _request_for(
    server: ServerState, tenant: str, body: _GenerationBody, text: str, raw: bool, param: str
) -> GenerationRequest:
    """The engine request for a checked body; 404 for an unknown user if so configured."""
    p = server.personalizer
    stops = stop_sequences(body.stop)
    steering = steering_config(p.steering, body.fints, p.model.num_layers)
    preferences = guidance_preferences(body.fints, p.modes, p.model.tokenizer)
    if body.user is not None:
        check_user(body.user)
        if server.config.unknown_user is UnknownUser.ERROR and not await run_in_threadpool(
            p.store.has_user, tenant, body.user
        ):
            raise ApiError(
                404,
                f"unknown user {body.user!r}: no history was added for this user",
                type="not_found_error",
                param="user",
                code="user_not_found",
            )
    return generation_request(
        user=body.user,
        tenant=tenant,
        text=text,
        raw=raw,
        steering=steering,
        stops=stops,
        limits=server.config.limits,
        param=param,
        preferences=preferences,
        adapter=body.fints.adapter if body.fints is not None else None,
    )


async def _await_job(job: GenerationJob) -> tuple[GenerationResult, int]:
    try:
        return await job.result()
    except asyncio.CancelledError:
        job.abandoned = True
        job.finish()
        raise
    except Exception as exc:
        raise api_error_for(exc) from None


async def _await_start(job: GenerationJob) -> Started:
    try:
        event = await job.next_event()
    except asyncio.CancelledError:
        job.abandoned = True
        job.finish()
        raise
    if isinstance(event, Failed):
        raise api_error_for(event.error)
    assert isinstance(event, Started)
    return event


async def _respond(
    server: ServerState,
    body: _GenerationBody,
    request: GenerationRequest,
    options: GenerationOptions,
    shape: Shape,
) -> Response:
    """Run one checked generation request and answer it in ``shape``.

    Streamed: an SSE response that starts once the job is admitted. Otherwise: the
    whole text (decoding ended at the first stop sequence) as one JSON body. The request
    holds one of its tenant's slots until it is answered (429 when none is free).
    """
    tenant, slots = request.tenant, server.slots
    slots.acquire(tenant)
    try:
        job = server.generation.submit(
            request, options, stream=body.stream, on_finished=lambda: slots.release(tenant)
        )
    except BaseException:
        slots.release(tenant)
        raise
    head = shape.head(body.model)
    if body.stream:
        started = await _await_start(job)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return stream_response(job, started, shape, head, include_usage)
    result, size = await _await_job(job)
    return json_response(shape, head, result, size)


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses={200: {"model": ChatCompletion, "content": _STREAM}, **_GENERATION},
)
async def chat(
    body: ChatCompletionRequest, request: Request, tenant: str = Depends(tenant_of)
) -> Response:
    server = server_of(request)
    options = _checked(server, body)
    p = server.personalizer
    text, raw = chat_prompt(body.messages, p.model.tokenizer, p.template)
    job_request = await _request_for(server, tenant, body, text, raw, "messages")
    return await _respond(server, body, job_request, options, CHAT)


@router.post(
    "/v1/completions",
    response_model=None,
    responses={200: {"model": Completion, "content": _STREAM}, **_GENERATION},
)
async def completions(
    body: CompletionRequest, request: Request, tenant: str = Depends(tenant_of)
) -> Response:
    server = server_of(request)
    options = _checked(server, body)
    text = completion_prompt(body.prompt)
    job_request = await _request_for(server, tenant, body, text, True, "prompt")
    return await _respond(server, body, job_request, options, COMPLETION)


# -- history --------------------------------------------------------------------------------


@router.post("/v1/users/{user}/interactions", responses=errors(400, *_AUTH, 409, 413, 429, 503))
async def add_interactions(
    body: AddInteractionsRequest,
    request: Request,
    user: str = Depends(user_in_path),
    tenant: str = Depends(tenant_of),
) -> AddInteractionsResponse:
    server = server_of(request)
    items = history_items(body.items, server.config.limits)
    extract = server.config.extract_on_write
    p, chunk, limits = (
        server.personalizer,
        server.config.extract_chunk_items,
        server.config.resources,
    )
    await run_in_threadpool(check_item_tokens, p.model.tokenizer, items, limits.max_item_tokens)

    def write() -> Steps[list[str]]:
        """Store the items (one transaction), then extract ``chunk`` items (trained
        vectors: train on ``chunk`` examples) per step."""
        ids = p.store.add_items(tenant, user, items, max_items=limits.max_items_per_user)
        if extract:
            yield
            began = time.perf_counter()
            for _ in p.build_steps(user, tenant=tenant, chunk_items=chunk):
                server.metrics.extraction_seconds.observe(time.perf_counter() - began)
                yield
                began = time.perf_counter()
        return ids

    server.slots.acquire(tenant)
    try:
        ids = await server.batcher.run_steps(write())
    except Exception as exc:
        raise api_error_for(exc) from None
    finally:
        server.slots.release(tenant)
    server.metrics.interactions_added.inc(len(ids))
    return AddInteractionsResponse(user=user, added=len(ids), ids=ids, extracted=extract)


@router.get("/v1/users/{user}/interactions", responses=errors(400, *_AUTH, 404))
async def list_interactions(
    request: Request, user: str = Depends(user_in_path), tenant: str = Depends(tenant_of)
) -> InteractionList:
    p = server_of(request).personalizer

    def read() -> tuple[list[HistoryItem], set[str]]:
        items = p.store.items(tenant, user)
        pending = p.store.items_without_entries(tenant, user, p.model.fingerprint)
        return items, {i.item_id for i in pending}

    try:
        items, pending = await run_in_threadpool(read)
    except Exception as exc:
        raise api_error_for(exc) from None
    return InteractionList(
        user=user,
        data=[
            StoredInteraction(
                id=i.item_id, input=i.input, output=i.output, extracted=i.item_id not in pending
            )
            for i in items
        ],
    )


@router.delete("/v1/users/{user}", responses=errors(400, *_AUTH, 404, 413, 429, 503))
async def delete_user(
    request: Request, user: str = Depends(user_in_path), tenant: str = Depends(tenant_of)
) -> DeletedUser:
    server = server_of(request)
    server.slots.acquire(tenant)
    try:
        await server.batcher.run_exclusive(
            lambda: server.personalizer.delete_user(user, tenant=tenant)
        )
    except Exception as exc:
        raise api_error_for(exc) from None
    finally:
        server.slots.release(tenant)
    server.metrics.users_deleted.inc()
    return DeletedUser(user=user)
