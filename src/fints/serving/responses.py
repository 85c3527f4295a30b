"""Response shaping: chat and text completion bodies, stream chunks, usage and headers.

A :class:`Shape` says what one generation endpoint's answers look like
(:data:`CHAT`, :data:`COMPLETION`); :func:`json_response` and
:func:`stream_response` answer a finished or a started job in it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypedDict

from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from fints.engine import GenerationResult
from fints.serving.api_errors import api_error_for
from fints.serving.api_spec import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    Completion,
    CompletionChoice,
    FintsInfo,
    Usage,
)
from fints.serving.batcher import Delta, Done, Failed, GenerationJob, Started
from fints.serving.payloads import StopFilter


class Head(TypedDict):
    """The fields that every response object and stream chunk of one request repeats."""

    id: str
    created: int
    model: str


def fints_info(result: GenerationResult, batch_size: int) -> FintsInfo:
    return FintsInfo(
        user=result.user,
        steered=result.steered,
        note=result.note,
        retrieved=list(result.retrieved),
        weights=[float(w) for w in result.weights],
        batch_size=batch_size,
        adapter=result.adapter,
    )


def steer_headers(result: GenerationResult) -> dict[str, str]:
    headers = {"x-fints-steered": "true" if result.steered else "false"}
    if not result.steered and result.note:
        headers["x-fints-reason"] = result.note.encode("ascii", "replace").decode()
    return headers


def usage(result: GenerationResult) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
    )


def sse(model: BaseModel | dict[str, Any]) -> str:
    """One server-sent event carrying ``model`` as JSON."""
    data = model if isinstance(model, dict) else model.model_dump(exclude_none=True)
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


@dataclass(frozen=True)
class Shape:
    """What one generation endpoint's answers look like; everything else they share.

    ``chunk(head, text delta, finish reason, first chunk?, fints info)`` builds one
    stream chunk, ``usage_chunk(head, usage)`` the closing usage-only chunk, and
    ``response(head, text, finish reason, usage, fints info)`` the non-streamed body.
    """

    id_prefix: str
    chunk: Callable[[Head, str | None, str | None, bool, FintsInfo | None], BaseModel]
    usage_chunk: Callable[[Head, Usage], BaseModel]
    response: Callable[[Head, str, str, Usage, FintsInfo], BaseModel]

    def head(self, model: str) -> Head:
        """A fresh id and timestamp for one request's answer."""
        return Head(id=f"{self.id_prefix}{uuid.uuid4().hex}", created=int(time.time()), model=model)


def _chat_chunk(
    head: Head, text: str | None, finish: str | None, first: bool, info: FintsInfo | None
) -> BaseModel:
    delta = ChatDelta(role="assistant", content="") if first else ChatDelta(content=text)
    choice = ChatChunkChoice(delta=delta, finish_reason=finish)
    return ChatCompletionChunk(**head, choices=[choice], fints=info)


def _chat_usage_chunk(head: Head, usage: Usage) -> BaseModel:
    return ChatCompletionChunk(**head, choices=[], usage=usage)


def _chat_response(head: Head, text: str, finish: str, usage: Usage, info: FintsInfo) -> BaseModel:
    choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finish)
    return ChatCompletion(**head, choices=[choice], usage=usage, fints=info)


def _completion_chunk(
    head: Head, text: str | None, finish: str | None, first: bool, info: FintsInfo | None
) -> BaseModel:
    choice = CompletionChoice(text=text or "", finish_reason=finish)
    return Completion(**head, choices=[choice], fints=info)


def _completion_usage_chunk(head: Head, usage: Usage) -> BaseModel:
    return Completion(**head, choices=[], usage=usage)


def _completion_response(
    head: Head, text: str, finish: str, usage: Usage, info: FintsInfo
) -> BaseModel:
    choice = CompletionChoice(text=text, finish_reason=finish)
    return Completion(**head, choices=[choice], usage=usage, fints=info)


CHAT = Shape("chatcmpl-", _chat_chunk, _chat_usage_chunk, _chat_response)
COMPLETION = Shape("cmpl-", _completion_chunk, _completion_usage_chunk, _completion_response)


def json_response(shape: Shape, head: Head, result: GenerationResult, size: int) -> JSONResponse:
    """The whole answer of a finished row (``size``: the rows of its batch) as one body."""
    body = shape.response(
        head, result.text, result.finish_reason, usage(result), fints_info(result, size)
    )
    return JSONResponse(body.model_dump(), headers=steer_headers(result))


def stream_response(
    job: GenerationJob, started: Started, shape: Shape, head: Head, include_usage: bool
) -> StreamingResponse:
    """An SSE response that relays a started job's text deltas as they are decoded.

    Decoding ends at the first stop sequence; a :class:`StopFilter` cuts the deltas
    already on their way, so the stream and a whole response carry the same text.
    """

    def chunk(text: str | None, finish: str | None, first: bool, info: FintsInfo | None) -> str:
        return sse(shape.chunk(head, text, finish, first, info))

    async def events() -> AsyncIterator[str]:
        yield chunk(None, None, True, fints_info(started.result, started.batch_size))
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
                yield chunk(None, finish, False, fints_info(event.result, event.batch_size))
                if include_usage:
                    yield sse(shape.usage_chunk(head, usage(event.result)))
                break
            elif isinstance(event, Failed):
                yield sse(api_error_for(event.error).body())
                break
        yield "data: [DONE]\n\n"

    headers = {**steer_headers(started.result), "cache-control": "no-cache"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
