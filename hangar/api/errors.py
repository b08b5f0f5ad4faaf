"""Every error leaves the API as a Fly-shaped body: ``{"error": message, "status": code}``."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hangar.errors import HTTP_STATUS_CODES, HangarError, Unauthenticated

log = logging.getLogger(__name__)


def error_response(
    http_status: int,
    message: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    status = code or HTTP_STATUS_CODES.get(http_status, HTTP_STATUS_CODES[500])
    # Messages can quote input; a lone surrogate in it would not encode, so escape it.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse(
        {"error": message, "status": status}, status_code=http_status, headers=headers
    )


def hangar_error_response(exc: HangarError) -> JSONResponse:
    """The response for ``exc``, with the headers its status calls for."""
    headers: dict[str, str] = {}
    retry_after_s = exc.fields.get("retry_after_s")
    if isinstance(retry_after_s, int | float):
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    if isinstance(exc, Unauthenticated):
        headers["WWW-Authenticate"] = "Bearer"
    return error_response(exc.http_status, exc.message, exc.code, headers or None)


def field_path(location: tuple[Any, ...] | list[Any]) -> str:
    """``('body', 'config', 'guest', 'cpus')`` -> ``config.guest.cpus``; list indexes kept."""
    parts = [str(part) for part in location[1:]] if location else []
    if not parts and location:
        parts = [str(location[0])]
    return ".".join(parts)


def _validation_message(error: dict[str, Any]) -> str:
    location = error.get("loc", ())
    path = field_path(location)
    message = str(error.get("msg", "invalid value"))
    if error.get("type") == "extra_forbidden":
        message = "is not a field hangar accepts"
    elif error.get("type") == "json_invalid":
        return "request body is not valid JSON"
    elif message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
        if tuple(location) == ("body",):
            return message  # a check of the whole body, whose message names the field
    return f"{path}: {message}" if path else message


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HangarError)
    async def _hangar_error(_request: Request, exc: HangarError) -> JSONResponse:
        if exc.http_status >= 500:
            log.error("internal error: %s %s", exc, exc.fields)
        return hangar_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        in_body = any(error.get("loc", ("",))[0] == "body" for error in errors)
        malformed = any(error.get("type") == "json_invalid" for error in errors)
        message = "; ".join(_validation_message(error) for error in errors[:5])
        status = 400 if malformed or not in_body else 422
        return error_response(status, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return error_response(exc.status_code, detail)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}")
