"""The request guard: ASGI middleware every API request passes before FastAPI reads it.

In order: the body's declared size, the token (401), the route's scope (403, or 404 for
another org's app), the rate limit (429), then the body itself, read up to the size limit
(413) and with at most ``body_timeout_s`` between its chunks (408). The route then runs with
the request's ``Access`` in its scope, and its body read as JSON whatever its declared type
(Fly does: ``curl -d`` sends a form type). Every mutating call is written to the audit log
with how it ended, whether the guard or the route answered.

Requests without a valid token are limited per client address (``anonymous``): past it they
get 429 and are not written to the audit log (a flood is logged once per episode), so that
nobody without a token can fill the host's disk through it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hangar.api.access import Access, AccessPolicy
from hangar.api.errors import hangar_error_response
from hangar.api.routetable import ApiOperation, RouteTable
from hangar.api.scopes import Scope as RouteScope
from hangar.api.services.audit import AuditService, Outcome
from hangar.errors import HangarError, RateLimited, RequestTimeout, RequestTooLarge, Unauthenticated
from hangar.ratelimit import FloodLog, RateLimiter
from hangar.settings import DEFAULT_MAX_REQUEST_BYTES
from hangar.store.protocol import ApiToken

log = logging.getLogger(__name__)

ACCESS_KEY = "hangar.access"
MAX_BODY_BYTES = DEFAULT_MAX_REQUEST_BYTES
DEFAULT_BODY_TIMEOUT_S = 30.0
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ANONYMOUS_ACTION = "unauthenticated"


class RequestObserver(Protocol):
    """Told how each API request ended (metrics)."""

    def api_request(self, route: str, method: str, status: int, seconds: float) -> None: ...

    def rate_limited(self, route: str) -> None: ...


@dataclass
class GuardConfig:
    policy: AccessPolicy
    limiter: RateLimiter
    audit: AuditService
    max_body_bytes: int = MAX_BODY_BYTES
    anonymous: RateLimiter | None = None
    """Requests without a valid token, per client address (None: not limited)."""
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    floods: FloodLog = field(default_factory=lambda: FloodLog(log, "anonymous requests"))
    observer: RequestObserver | None = None


@dataclass
class _Attempt:
    """What the audit log needs to know about one request, filled in as it goes."""

    action: str
    target: dict[str, str]
    token: ApiToken | None = None
    access: Access | None = None
    status: int = 500
    outcome: str = Outcome.ERROR

    def org_slug(self) -> str:
        """The org acted in; for a refused request, the caller's own org, as the target's may
        not exist and must not be revealed."""
        if self.access is not None:
            return self.access.audit_target.get("org") or self.access.org_slug or ""
        if self.token is not None and self.token.org_slug is not None:
            return self.token.org_slug
        return ""


def rate_limit_target(path_params: dict[str, Any]) -> str:
    """What a request's rate limit is counted on: the machine, else the app, else nothing
    more than the action itself."""
    return str(path_params.get("machine_id") or path_params.get("app_name") or "")


class RequestGuard:
    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute], config: GuardConfig) -> None:
        self.app = app
        self._table = RouteTable(routes)
        self._config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        matched = None
        if scope["type"] == "http":
            matched = self._table.match(scope["method"], scope["path"])
        if matched is None:
            # Not an API route: the OpenAPI document, or a path or method FastAPI will refuse.
            await self.app(scope, receive, send)
            return
        route, path_params = matched
        attempt = _Attempt(action=route.name, target={k: str(v) for k, v in path_params.items()})
        mutating = scope["method"] not in READ_METHODS
        started = time.monotonic()
        try:
            await self._guarded(scope, receive, send, route, path_params, attempt)
        except Exception:
            attempt.outcome = Outcome.ERROR
            raise
        finally:
            observer = self._config.observer
            if observer is not None:
                seconds = time.monotonic() - started
                observer.api_request(route.name, scope["method"], attempt.status, seconds)
                if attempt.outcome == Outcome.RATE_LIMITED:
                    observer.rate_limited(route.name)
            anonymous_flood = attempt.token is None and attempt.outcome == Outcome.RATE_LIMITED
            if mutating and not anonymous_flood:
                self._config.audit.record(
                    attempt.token,
                    attempt.org_slug(),
                    attempt.action,
                    attempt.access.audit_target if attempt.access else attempt.target,
                    attempt.status,
                    attempt.outcome,
                )

    async def _guarded(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        route: ApiOperation,
        path_params: dict[str, Any],
        attempt: _Attempt,
    ) -> None:
        headers = _headers(scope)
        try:
            declared_length = int(headers.get("content-length", "0") or "0")
        except ValueError:
            declared_length = 0
        try:
            if declared_length > self._config.max_body_bytes:
                raise self._too_large()
            access = self._admit(headers, route, path_params, attempt, _client_address(scope))
            body = await self._read_body(receive)
        except HangarError as exc:
            attempt.status = exc.http_status
            if attempt.outcome != Outcome.DENIED:
                attempt.outcome = (
                    Outcome.RATE_LIMITED if isinstance(exc, RateLimited) else Outcome.REJECTED
                )
            await hangar_error_response(exc)(scope, receive, send)
            return

        scope[ACCESS_KEY] = access
        if body:
            read_as_json(scope, headers.get("content-type", ""))
        attempt.status, attempt.outcome = 500, Outcome.ERROR
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                attempt.status = int(message["status"])
                attempt.outcome = Outcome.of_status(attempt.status)
            await send(message)

        await self.app(scope, replay, send_and_note)

    def _admit(
        self,
        headers: dict[str, str],
        route: ApiOperation,
        path_params: dict[str, Any],
        attempt: _Attempt,
        client: str,
    ) -> Access:
        # A route that declares no scope is served to the operator alone.
        route_scope = route.scope or RouteScope.OPERATOR
        policy = self._config.policy
        attempt.outcome = Outcome.DENIED
        try:
            attempt.token = policy.authenticate(headers.get("authorization"))
        except Unauthenticated:
            self._limit_anonymous(client, attempt)
            raise
        access = policy.authorize(attempt.token, route_scope, path_params)
        access.note(**attempt.target)
        attempt.access = access
        attempt.outcome = Outcome.REJECTED
        self._config.limiter.take(access.actor, route.name, rate_limit_target(path_params))
        return access

    def _limit_anonymous(self, client: str, attempt: _Attempt) -> None:
        limiter = self._config.anonymous
        if limiter is None:
            return
        try:
            limiter.take(f"client:{client}", ANONYMOUS_ACTION, "")
        except RateLimited:
            attempt.outcome = Outcome.RATE_LIMITED
            self._config.floods.note(client)
            raise

    def _too_large(self) -> RequestTooLarge:
        return too_large(self._config.max_body_bytes)

    async def _read_body(self, receive: Receive) -> bytes:
        return await read_body(receive, self._config.max_body_bytes, self._config.body_timeout_s)


def too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"request body is larger than {limit} bytes", limit=limit)


async def read_body(receive: Receive, max_bytes: int, timeout_s: float) -> bytes:
    """A request's body, read up to ``max_bytes`` (413 past it) with at most ``timeout_s``
    between its chunks (408)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            message = await asyncio.wait_for(receive(), timeout_s)
        except TimeoutError:
            raise RequestTimeout(
                f"the request body did not arrive within {timeout_s:g}s", timeout_s=timeout_s
            ) from None
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise too_large(max_bytes)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def read_as_json(scope: Scope, content_type: str) -> None:
    """Every API body is JSON: a request that says otherwise is read as JSON all the same."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        return
    scope["headers"] = [
        (name, value) for name, value in scope.get("headers", []) if name.lower() != b"content-type"
    ] + [(b"content-type", b"application/json")]


def _client_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _headers(scope: Scope) -> dict[str, str]:
    return {
        name.decode("latin-1").lower(): value.decode("latin-1")
        for name, value in scope.get("headers", [])
    }
