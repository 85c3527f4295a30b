"""Errors in the OpenAI format, and the mapping from every exception to one.

:class:`ApiError` is an error the server answers as ``{"error": {message, type,
param, code}}``; :func:`api_error_for` turns an exception raised by the engine,
the store or the request validation into one, and :func:`install_error_handlers`
makes every failure of an app answer that way.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from fints.errors import (
    CorruptDataError,
    DictionaryMismatchError,
    FintsError,
    InvalidInputError,
    LimitExceededError,
    StoreUnavailableError,
    UnknownUserError,
)
from fints.serving.api_spec import PATTERN_HELP

log = logging.getLogger("fints.serving")

ErrorType = Literal[
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "server_error",
    "overloaded_error",
    "rate_limit_error",
]


class ApiError(Exception):
    """An error answered to the client as ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: ErrorType = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        message, param = _printable(message), None if param is None else _printable(param)
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def _printable(text: str) -> str:
    """``text`` encodable as UTF-8 (a lone surrogate written as ``\\ud800``), so that no
    error body can fail to encode."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def api_error_for(exc: BaseException) -> ApiError:
    """The API error for an exception raised by the engine, the store or the server."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UnknownUserError):
        return ApiError(404, str(exc), type="not_found_error", param="user", code="user_not_found")
    if isinstance(exc, StoreUnavailableError):
        log.error("store write refused: %s", exc)
        return ApiError(503, str(exc), type="server_error", code=f"store_{exc.reason}")
    if isinstance(exc, CorruptDataError):
        log.error("corrupt stored data: %s", exc)
        return ApiError(503, str(exc), type="server_error", code="store_corrupt")
    if isinstance(exc, LimitExceededError):
        code = f"{exc.limit.removeprefix('max_')}_exceeded"
        return ApiError(400, str(exc), param=exc.param, code=code)
    if isinstance(exc, InvalidInputError):
        return ApiError(400, str(exc))
    if isinstance(exc, DictionaryMismatchError):
        return ApiError(409, str(exc), code="dictionary_mismatch")
    if isinstance(exc, FintsError):
        return ApiError(400, str(exc))
    log.error("internal error", exc_info=exc)
    return ApiError(500, f"internal server error ({type(exc).__name__})", type="server_error")


_SOURCES = ("body", "path", "query", "header", "cookie")


def _param(loc: tuple[Any, ...]) -> str | None:
    """``("body", "items", 0, "x")`` -> ``"items[0].x"``; ``("path", "user")`` -> ``"user"``."""
    if loc and loc[0] in _SOURCES:
        loc = loc[1:]
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or None


def validation_error(exc: RequestValidationError) -> ApiError:
    """The API error for a request body that does not match the wire format."""
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
    ctx = dict(first.get("ctx") or {})
    message = str(first.get("msg"))
    if kind == "invalid_unicode":  # found by a body's own check: it names the field
        param = str(ctx.get("param") or param)
    elif kind == "string_pattern_mismatch" and ctx.get("pattern") in PATTERN_HELP:
        message = f"must be {PATTERN_HELP[ctx['pattern']]}"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return ApiError(400, f"{param}: {message}{more}", param=param, code="invalid_value")


def _http_error(exc: StarletteHTTPException) -> ApiError:
    if exc.status_code == 404:
        return ApiError(404, f"unknown path: {exc.detail}", type="not_found_error")
    if exc.status_code == 413:  # the body limit, while reading a body without a length
        return ApiError(413, str(exc.detail), code="request_too_large")
    return ApiError(exc.status_code, str(exc.detail))


async def _on_error(_request: Request, exc: Exception) -> Response:
    return error_response(api_error_for(exc))


async def _on_validation(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return error_response(validation_error(exc))


async def _on_http(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(_http_error(exc))


def install_error_handlers(app: FastAPI) -> None:
    """Every error of ``app`` answers in the OpenAI format."""
    app.add_exception_handler(ApiError, _on_error)
    app.add_exception_handler(FintsError, _on_error)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_error)
