"""Errors as OpenAI's API shapes them: ``{"error": {"message", "type", "param", "code"}}``.

The model gateway answers in this shape (not the Machines API's Fly shape) so that OpenAI
clients raise their usual exceptions; mid-stream, the same object travels as one last
server-sent event, which the official client raises as ``APIError``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.responses import JSONResponse

from hangar.errors import HangarError, RateLimited, ServiceUnavailable, Unauthenticated

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(status: int, message: str, code: str | None, param: str | None = None) -> bytes:
    # Messages can quote input; a lone surrogate in it would not encode, so escape it.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    error: dict[str, Any] = {
        "message": message,
        "type": _TYPES.get(status, "server_error"),
        "param": param,
        "code": code,
    }
    return json.dumps({"error": error}).encode()


def error_response(
    status: int,
    message: str,
    code: str | None,
    *,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    response = JSONResponse(None, status_code=status, headers=headers)
    response.body = error_body(status, message, code, param)
    response.headers["content-length"] = str(len(response.body))
    return response


def hangar_error_response(exc: HangarError) -> JSONResponse:
    headers: dict[str, str] = {}
    retry_after_s = exc.fields.get("retry_after_s")
    if isinstance(exc, RateLimited | ServiceUnavailable) and isinstance(retry_after_s, int | float):
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    if isinstance(exc, Unauthenticated):
        headers["WWW-Authenticate"] = "Bearer"
    param = exc.fields.get("param")
    return error_response(
        exc.http_status,
        exc.message,
        exc.code,
        param=param if isinstance(param, str) else None,
        headers=headers or None,
    )


def sse_error_event(exc: HangarError) -> bytes:
    """The last event of a stream that broke off: the error, and no ``[DONE]`` after it."""
    return b"data: " + error_body(exc.http_status, exc.message, exc.code) + b"\n\n"
