"""The model gateway: OpenAI's API in front of a deployment's replicas.

``/v1/models``, ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings``, called
with an org token or a per-deployment API key exactly as one calls OpenAI. ``model`` picks the
deployment (a model of another org answers exactly as one that does not exist); the request
goes to its replica with the fewest requests in flight (``ReplicaPool``), waking one if none
runs. Streams pass through event by event as the engine writes them; a replica that breaks
off mid-stream ends the stream with an error event. A client that goes away cancels its
upstream request. Token usage is recorded through the ``Metering`` seam. Every error is in
OpenAI's shape. Bounded: request and answer sizes, one event's size, requests in flight,
each deployment's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from hangar.clock import Clock, SystemClock
from hangar.errors import (
    BadGateway,
    HangarError,
    InvalidRequest,
    ModelNotFound,
    RequestTooLarge,
    ServiceUnavailable,
    Unauthenticated,
)
from hangar.llm.openai_errors import error_response, hangar_error_response, sse_error_event
from hangar.llm.pool import PoolPolicy, ReplicaPool
from hangar.llm.seams import (
    Authenticator,
    Caller,
    Deployment,
    Deployments,
    Metering,
    Replicas,
    Usage,
)
from hangar.llm.sse import EventSplitter, StreamTally, token_counts

log = logging.getLogger(__name__)

ENDPOINTS = {
    "/v1/chat/completions": "chat.completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}
_STREAM_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_UPSTREAM_HEADERS = {"content-type": "application/json", "accept-encoding": "identity"}


@dataclass(frozen=True)
class GatewayConfig:
    max_body_bytes: int = 4 * 1024 * 1024
    max_response_bytes: int = 16 * 1024 * 1024  # one non-streamed answer, held whole
    max_event_bytes: int = 1024 * 1024  # one server-sent event
    max_requests: int = 1024  # in flight or waiting, all deployments together
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 600.0  # longest silence of a replica within one answer
    health_timeout_s: float = 2.0
    reconcile_interval_s: float = 5.0  # idle suspension and min_replicas; 0: only on demand
    pool: PoolPolicy = field(default_factory=PoolPolicy)


@dataclass
class _Call:
    """One accepted request, ready to go to a replica."""

    caller: Caller
    deployment: Deployment
    endpoint: str
    path: str
    body: bytes
    stream: bool
    strip_usage_event: bool


class Gateway:
    def __init__(
        self,
        auth: Authenticator,
        deployments: Deployments,
        replicas: Replicas,
        metering: Metering,
        *,
        clock: Clock | None = None,
        config: GatewayConfig | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._auth = auth
        self._deployments = deployments
        self._replicas = replicas
        self._metering = metering
        self._clock = clock or SystemClock()
        self.config = config or GatewayConfig()
        self._pools: dict[str, ReplicaPool] = {}
        self._requests = 0
        self._reconcile_lock = asyncio.Lock()
        self._http = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(
                self.config.read_timeout_s, connect=self.config.connect_timeout_s
            ),
            limits=httpx.Limits(
                max_connections=self.config.max_requests,
                max_keepalive_connections=min(self.config.max_requests, 128),
            ),
            follow_redirects=False,
            trust_env=False,
        )
        self.app = self._build_app()

    # -- the ASGI application -------------------------------------------------------------
    def _build_app(self) -> Starlette:
        routes = [
            Route("/v1/models", self._list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", self._get_model, methods=["GET"]),
            *(
                Route(path, _Forward(self, path, endpoint), methods=["POST"])
                for path, endpoint in ENDPOINTS.items()
            ),
        ]

        async def http_error(_request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)
            message = "not found" if exc.status_code == 404 else str(exc.detail)
            return error_response(exc.status_code, message, None)

        async def hangar_error(_request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HangarError)
            return hangar_error_response(exc)

        async def unexpected(_request: Request, exc: Exception) -> Response:
            log.error("the model gateway failed", exc_info=exc)
            return error_response(500, f"internal error: {type(exc).__name__}", None)

        @asynccontextmanager
        async def lifespan(_app: Starlette) -> AsyncIterator[None]:
            loop = None
            if self.config.reconcile_interval_s > 0:
                loop = asyncio.create_task(self._reconcile_forever())
            try:
                yield
            finally:
                if loop is not None:
                    loop.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await loop
                await self.aclose()

        return Starlette(
            routes=routes,
            exception_handlers={
                HTTPException: http_error,
                HangarError: hangar_error,
                Exception: unexpected,
            },
            lifespan=lifespan,
        )

    async def aclose(self) -> None:
        for pool in self._pools.values():
            await pool.close()
        await self._http.aclose()

    # -- who and what ---------------------------------------------------------------------
    async def authenticate(self, request: Request) -> Caller:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(
                "You didn't provide an API key: send it as 'Authorization: Bearer TOKEN'."
            )
        caller = await self._auth.authenticate(token.strip())
        if caller is None:
            raise Unauthenticated("Incorrect API key provided.")
        return caller

    async def visible_deployments(self, caller: Caller) -> list[Deployment]:
        """The deployments the caller may call: its org's, or only its key's."""
        return [
            deployment
            for deployment in await self._deployments.of_org(caller.org)
            if deployment.org == caller.org and caller.deployment in (None, deployment.id)
        ]

    async def deployment(self, caller: Caller, model: str) -> Deployment:
        for deployment in await self.visible_deployments(caller):
            if deployment.name == model:
                return deployment
        raise ModelNotFound(model)

    def pool(self, deployment: Deployment) -> ReplicaPool:
        pool = self._pools.get(deployment.id)
        if pool is None:
            pool = ReplicaPool(
                deployment, self._replicas, self._probe, self._clock, self.config.pool
            )
            self._pools[deployment.id] = pool
        pool.deployment = deployment
        return pool

    async def _probe(self, address: str) -> bool:
        try:
            response = await self._http.get(
                f"{address}/health", timeout=self.config.health_timeout_s
            )
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    # -- /v1/models -----------------------------------------------------------------------
    @staticmethod
    def _model_object(deployment: Deployment) -> dict[str, Any]:
        return {
            "id": deployment.name,
            "object": "model",
            "created": deployment.created_at,
            "owned_by": deployment.org,
        }

    async def _list_models(self, request: Request) -> Response:
        caller = await self.authenticate(request)
        deployments = sorted(await self.visible_deployments(caller), key=lambda d: d.name)
        return JSONResponse(
            {"object": "list", "data": [self._model_object(d) for d in deployments]}
        )

    async def _get_model(self, request: Request) -> Response:
        caller = await self.authenticate(request)
        deployment = await self.deployment(caller, request.path_params["model"])
        return JSONResponse(self._model_object(deployment))

    # -- forwarding -----------------------------------------------------------------------
    async def _accept(self, request: Request, path: str, endpoint: str) -> _Call:
        """Check who asks and what for; the request as it goes to the replica."""
        caller = await self.authenticate(request)
        body = await self._read_body(request)
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise InvalidRequest(f"the request body is not valid JSON: {exc}") from exc
        if not isinstance(payload, dict):
            raise InvalidRequest("the request body must be a JSON object")
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("you must provide a model parameter", param="model")
        deployment = await self.deployment(caller, model)
        stream = endpoint != "embeddings" and payload.get("stream") is True
        strip_usage_event = False
        if stream:
            options = payload.get("stream_options")
            options = dict(options) if isinstance(options, dict) else {}
            if options.get("include_usage") is not True:
                strip_usage_event = True
                options["include_usage"] = True
                payload["stream_options"] = options
                body = json.dumps(payload).encode()
        return _Call(caller, deployment, endpoint, path, body, stream, strip_usage_event)

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RequestTooLarge(f"the request body is larger than {limit} bytes", limit=limit)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestTooLarge(f"the request body is larger than {limit} bytes", limit=limit)
        return bytes(body)

    def _admit(self) -> None:
        if self._requests >= self.config.max_requests:
            raise ServiceUnavailable(
                "the gateway is at its limit of requests in flight",
                app="",
                reason="gateway at its limit of requests in flight",
                retry_after_s=self.config.pool.retry_after_s,
            )
        self._requests += 1

    def _done(self) -> None:
        self._requests -= 1

    async def _serve(self, call: _Call, send: Send) -> None:
        """Lease a replica, forward the request, relay or stream its answer, meter it."""
        try:
            lease = await self.pool(call.deployment).acquire()
        except HangarError as exc:
            await _send_error(send, exc)
            return
        replica = lease.replica
        failed = False
        try:
            request = self._http.build_request(
                "POST",
                f"{replica.address}{call.path}",
                content=call.body,
                headers=_UPSTREAM_HEADERS,
            )
            try:
                upstream = await self._http.send(request, stream=True)
            except httpx.HTTPError as exc:
                failed = True
                await _send_error(send, self._replica_failed(call, replica.id, exc))
                return
            try:
                event_stream = upstream.headers.get("content-type", "").startswith(
                    "text/event-stream"
                )
                if call.stream and upstream.status_code == 200 and event_stream:
                    failed = await self._stream(call, replica.id, upstream, send)
                else:
                    failed = await self._relay(call, replica.id, upstream, send)
            finally:
                await upstream.aclose()
        finally:
            lease.release(failed=failed)

    async def _relay(self, call: _Call, replica: str, upstream: httpx.Response, send: Send) -> bool:
        """Pass a whole answer on; whether the replica failed."""
        body = bytearray()
        try:
            async for chunk in upstream.aiter_raw():
                body += chunk
                if len(body) > self.config.max_response_bytes:
                    raise BadGateway(
                        f"the answer of replica {replica} is larger than "
                        f"{self.config.max_response_bytes} bytes",
                        replica=replica,
                    )
        except (httpx.HTTPError, BadGateway) as exc:
            await _send_error(send, self._replica_failed(call, replica, exc))
            return True
        if upstream.status_code >= 500:
            detail = _upstream_message(bytes(body)) or f"HTTP {upstream.status_code}"
            await _send_error(
                send,
                BadGateway(
                    f"replica {replica} of model {call.deployment.name!r} failed: {detail}",
                    replica=replica,
                    upstream_status=upstream.status_code,
                ),
            )
            return True
        content_type = upstream.headers.get("content-type", "application/json")
        await send(
            {
                "type": "http.response.start",
                "status": upstream.status_code,
                "headers": [
                    (b"content-type", content_type.encode("latin-1")),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": bytes(body), "more_body": False})
        if upstream.status_code == 200:
            with contextlib.suppress(ValueError):
                parsed = json.loads(body)
                usage = parsed.get("usage") if isinstance(parsed, dict) else None
                await self._meter(call, token_counts(usage))
        return False

    async def _stream(
        self, call: _Call, replica: str, upstream: httpx.Response, send: Send
    ) -> bool:
        """Pass events on as they arrive; whether the replica failed."""
        await send({"type": "http.response.start", "status": 200, "headers": _STREAM_HEADERS})
        splitter = EventSplitter(self.config.max_event_bytes)
        tally = StreamTally(strip_usage_event=call.strip_usage_event)
        failure: HangarError | None = None
        try:
            async for chunk in upstream.aiter_raw():
                passed = [event for event in splitter.feed(chunk) if tally.see(event)]
                if passed:
                    body = passed[0] if len(passed) == 1 else b"".join(passed)
                    await send({"type": "http.response.body", "body": body, "more_body": True})
            if not tally.done:
                raise BadGateway(f"replica {replica} ended the stream before it was done")
        except (httpx.HTTPError, BadGateway) as exc:
            failure = self._replica_failed(call, replica, exc)
            await send(
                {"type": "http.response.body", "body": sse_error_event(failure), "more_body": True}
            )
        finally:
            counts = token_counts(tally.usage)
            await self._meter(call, counts or (0, tally.choice_events))
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return failure is not None

    def _replica_failed(self, call: _Call, replica: str, exc: Exception) -> BadGateway:
        why = exc.message if isinstance(exc, HangarError) else type(exc).__name__
        log.warning("deployment %s: replica %s failed: %r", call.deployment.id, replica, exc)
        return BadGateway(
            f"replica {replica} of model {call.deployment.name!r} failed: {why}",
            replica=replica,
            deployment=call.deployment.id,
        )

    async def _meter(self, call: _Call, counts: tuple[int, int] | None) -> None:
        if counts is None or counts == (0, 0):
            return
        record = Usage(
            org=call.deployment.org,
            deployment=call.deployment.id,
            token_id=call.caller.token_id,
            endpoint=call.endpoint,
            prompt_tokens=counts[0],
            completion_tokens=counts[1],
            at=self._clock.now(),
        )
        try:
            await self._metering.record(record)
        except Exception:
            log.exception("metering failed for deployment %s", call.deployment.id)

    # -- idle suspension ------------------------------------------------------------------
    async def reconcile(self) -> None:
        """One pass over every deployment: suspend idle replicas down to ``min_replicas``,
        wake replicas up to it; forget deployments that are gone."""
        async with self._reconcile_lock:
            deployments = await self._deployments.all()
            for deployment in deployments:
                try:
                    await self.pool(deployment).reconcile()
                except Exception:
                    log.exception("reconciling deployment %s failed", deployment.id)
            current = {deployment.id for deployment in deployments}
            for gone in [d for d, pool in self._pools.items() if d not in current]:
                if not self._pools[gone].busy():
                    del self._pools[gone]

    async def _reconcile_forever(self) -> None:
        while True:
            await self._clock.sleep(self.config.reconcile_interval_s)
            try:
                await self.reconcile()
            except Exception:
                log.exception("gateway reconcile failed")


class _Forward:
    """The ASGI endpoint of one OpenAI route: accept, then serve while watching for the
    client to go away (which cancels the upstream request)."""

    def __init__(self, gateway: Gateway, path: str, endpoint: str) -> None:
        self._gateway = gateway
        self._path = path
        self._endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = self._gateway
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            gateway._admit()
        except HangarError as exc:
            await _send_error(send, exc)
            return
        try:
            call = await gateway._accept(Request(scope, receive), self._path, self._endpoint)
            await _until_disconnect(gateway._serve(call, tracked_send), receive)
        except ClientDisconnect:
            return
        except HangarError as exc:
            if not started:
                await _send_error(send, exc)
        except Exception:
            log.exception("the gateway failed on %s", self._path)
            if not started:
                await _send_error(send, HangarError("internal error in the model gateway"))
        finally:
            gateway._done()


async def _send_error(send: Send, exc: HangarError) -> None:
    response = hangar_error_response(exc)
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": response.raw_headers,
        }
    )
    await send({"type": "http.response.body", "body": response.body, "more_body": False})


async def _until_disconnect(work: Awaitable[None], receive: Receive) -> None:
    """Run ``work``; if the client disconnects first, cancel it."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if not task.cancelled():
        task.result()


async def _disconnected(receive: Receive) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return


def _upstream_message(body: bytes) -> str | None:
    with contextlib.suppress(ValueError):
        parsed = json.loads(body)
        error = parsed.get("error") if isinstance(parsed, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        if isinstance(message, str):
            return message[:500]
    return None
