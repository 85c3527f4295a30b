"""The HTTP handlers, on one :class:`APIRouter`.

Each handler finds what it needs (personalizer, batcher, limits, metrics) on
``request.app.state.fints`` (:func:`~fints.serving.state.server_of`), so the
router holds no state and one process can serve several apps.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from fints.engine import GenerationRequest, GenerationResult, UnknownUser
from fints.generation import GenerationOptions
from fints.history import HistoryItem
from fints.serving.api_errors import ApiError, api_error_for
from fints.serving.api_spec import (
    AddInteractionsRequest,
    AddInteractionsResponse,
    ChatCompletionRequest,
    CompletionRequest,
    DeletedUser,
    InteractionList,
    ModelCard,
    ModelList,
    StoredInteraction,
)
from fints.serving.batcher import Batcher, Failed, GenerationJob, Started
from fints.serving.payloads import (
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
from fints.serving.responses import CHAT, COMPLETION, Shape, json_response, stream_response
from fints.serving.state import ServerState, server_of

router = APIRouter()

_GenerationBody = ChatCompletionRequest | CompletionRequest


def tenant_of(
    request: Request,
    authorization: str | None = Header(default=None),
    x_fints_tenant: str | None = Header(default=None),
) -> str:
    """The tenant whose data a request may see (from its API key)."""
    return server_of(request).tenants.resolve(authorization, x_fints_tenant)


# -- service --------------------------------------------------------------------------------


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    server = server_of(request)
    ok = server.batcher.running
    return JSONResponse(
        {
            "status": "ok" if ok else "unavailable",
            "model": server.model_id,
            "tenancy": "single-tenant" if server.tenants.single_tenant else "multi-tenant",
            "queue_depth": server.batcher.depth,
            "max_batch_size": server.config.max_batch_size,
        },
        status_code=200 if ok else 503,
    )


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    body, content_type = server_of(request).metrics.render()
    return Response(body, media_type=content_type)


@router.get("/v1/models")
async def models(request: Request, _tenant: str = Depends(tenant_of)) -> ModelList:
    server = server_of(request)
    return ModelList(data=[ModelCard(id=m, created=server.created) for m in server.served])


@router.get("/v1/models/{model:path}")
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
    )


async def _await_job(job: GenerationJob) -> tuple[GenerationResult, int]:
    try:
        return await job.result()
    except asyncio.CancelledError:
        job.abandoned = True
        raise
    except Exception as exc:
        raise api_error_for(exc) from None


async def _await_start(job: GenerationJob) -> Started:
    try:
        event = await job.next_event()
    except asyncio.CancelledError:
        job.abandoned = True
        raise
    if isinstance(event, Failed):
        raise api_error_for(event.error)
    assert isinstance(event, Started)
    return event


async def _respond(
    batcher: Batcher,
    body: _GenerationBody,
    request: GenerationRequest,
    options: GenerationOptions,
    shape: Shape,
) -> Response:
    """Run one checked generation request and answer it in ``shape``.

    Streamed: an SSE response that starts once the job is admitted. Otherwise: the
    whole text (decoding ended at the first stop sequence) as one JSON body.
    """
    job = batcher.submit(request, options, stream=body.stream)
    head = shape.head(body.model)
    if body.stream:
        started = await _await_start(job)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return stream_response(job, started, shape, head, include_usage)
    result, size = await _await_job(job)
    return json_response(shape, head, result, size)


@router.post("/v1/chat/completions", response_model=None)
async def chat(
    body: ChatCompletionRequest, request: Request, tenant: str = Depends(tenant_of)
) -> Response:
    server = server_of(request)
    options = _checked(server, body)
    p = server.personalizer
    text, raw = chat_prompt(body.messages, p.model.tokenizer, p.template)
    job_request = await _request_for(server, tenant, body, text, raw, "messages")
    return await _respond(server.batcher, body, job_request, options, CHAT)


@router.post("/v1/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, tenant: str = Depends(tenant_of)
) -> Response:
    server = server_of(request)
    options = _checked(server, body)
    text = completion_prompt(body.prompt)
    job_request = await _request_for(server, tenant, body, text, True, "prompt")
    return await _respond(server.batcher, body, job_request, options, COMPLETION)


# -- history --------------------------------------------------------------------------------


@router.post("/v1/users/{user}/interactions")
async def add_interactions(
    user: str, body: AddInteractionsRequest, request: Request, tenant: str = Depends(tenant_of)
) -> AddInteractionsResponse:
    server = server_of(request)
    check_user(user)
    items = history_items(body.items, server.config.limits)
    extract = server.config.extract_on_write

    def write() -> list[str]:
        began = time.perf_counter()
        try:
            return server.personalizer.add_history(user, items, tenant=tenant, build=extract)
        finally:
            server.metrics.extraction_seconds.observe(time.perf_counter() - began)

    try:
        ids = await server.batcher.run_exclusive(write)
    except Exception as exc:
        raise api_error_for(exc) from None
    server.metrics.interactions_added.inc(len(ids))
    return AddInteractionsResponse(user=user, added=len(ids), ids=ids, extracted=extract)


@router.get("/v1/users/{user}/interactions")
async def list_interactions(
    user: str, request: Request, tenant: str = Depends(tenant_of)
) -> InteractionList:
    p = server_of(request).personalizer
    check_user(user)

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


@router.delete("/v1/users/{user}")
async def delete_user(user: str, request: Request, tenant: str = Depends(tenant_of)) -> DeletedUser:
    server = server_of(request)
    check_user(user)
    try:
        await server.batcher.run_exclusive(
            lambda: server.personalizer.delete_user(user, tenant=tenant)
        )
    except Exception as exc:
        raise api_error_for(exc) from None
    server.metrics.users_deleted.inc()
    return DeletedUser(user=user)
