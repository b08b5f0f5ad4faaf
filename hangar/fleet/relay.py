"""The relay: a guest operation carried from an API replica to the agent of the machine's host,
and its answer back.

A replica runs no guest, so what must touch one (exec, ps, signal, the console) or a host's
disk (a volume's create and delete) is sent to the agent of the host it is on:

- **Agent side** (``RelayServer``): each ``hangar agent --etcd`` given the fleet's key serves a
  small HTTP server on its host's address (``HANGAR_RELAY_ADDRESS``, ``HANGAR_RELAY_PORT``),
  registered as its ``HostRecord.address``. Its routes call the host's own Machines API
  services (built by the same ``build_api`` as ``hangar server``), so what they do and the
  errors they raise are the ones a single host's API has. Its error bodies are Fly's plus the
  error's fields and whether to retry, so the replica raises the same error.
- **Replica side** (``HostRelays``, the services' ``RemoteGuests``): finds the machine's host
  in the registrations, signs the request and answers with what the host answered. A host
  whose lease expired, or that does not answer, is a Fly-shaped 503 naming it (retryable); a
  host whose agent runs no relay (no fleet key) a 422 that says so.
- **Credential** (``RelayCredential``): both ends hold the fleet's key; neither sends it. Each
  request carries a timestamp, a random nonce and an HMAC-SHA256 (under a key derived from the
  fleet's) over the method, path and query, timestamp, nonce and the body's digest. The agent
  takes it only within ``MAX_SKEW_S`` of its clock and only once (nonces are remembered for
  the window, at most ``MAX_NONCES``); anything else is 401.

Bounds are the single host's: the request body (``HANGAR_MAX_REQUEST_BYTES``, and the header
and body timeouts), connections (``HANGAR_MAX_CONNECTIONS`` on the relay's listener, and as the
replica's pool to the hosts), exec output and timeout (the guest channel's own caps, applied
by the agent; the replica waits the exec's timeout plus the channel's transfer margin and reads
at most what such an answer can hold), log followers (the host's console readers).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import secrets
import socket
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

import httpx
from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from starlette.background import BackgroundTask
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hangar import http_server
from hangar.agent.agent import Agent
from hangar.api.deps import LeaseNonce
from hangar.api.errors import hangar_error_response, install_error_handlers
from hangar.api.guard import read_body, too_large
from hangar.api.schemas import ExecRequest, ExecResponse, OkResponse, ProcessStat, SignalRequest
from hangar.api.services.hosts import GpuView, HostService
from hangar.api.services.machines import MachineService
from hangar.api.services.volumes import RUN_WAIT_S, VolumeService
from hangar.api.volume_schemas import (
    CreateVolumeRequest,
    ExtendVolumeRequest,
    ExtendVolumeResponse,
    VolumeSnapshotView,
    VolumeView,
)
from hangar.clock import Clock
from hangar.errors import (
    BadGateway,
    HangarError,
    NotFound,
    RateLimited,
    ServiceUnavailable,
    Unauthenticated,
    Unprocessable,
)
from hangar.fleet.placer import FleetPlacer
from hangar.fleet.stores import FleetStores
from hangar.metrics import HangarMetrics
from hangar.model.config import GuestConfig
from hangar.model.gpu import GpuEvent
from hangar.model.guest_contract import EXEC_OUTPUT_CAP
from hangar.model.host import HostInfo
from hangar.model.machine import Machine
from hangar.model.volume import Volume
from hangar.server import ApiStores, build_api
from hangar.settings import Settings
from hangar.store.embedded import EmbeddedStores
from hangar.store.etcd.hosts import HostMonitor
from hangar.store.etcd.sealed import Sealer
from hangar.vmm.guest_exec import PS_TIMEOUT_S, TIMEOUT_MAX_S, TRANSFER_MARGIN_S

log = logging.getLogger(__name__)

PREFIX = "/relay/v1/apps"
HOSTS_PREFIX = "/relay/v1/hosts"
PURPOSE = "relay credential"
TIME_HEADER = "x-hangar-relay-time"
NONCE_HEADER = "x-hangar-relay-nonce"
SIGNATURE_HEADER = "x-hangar-relay-signature"
MAX_SKEW_S = 30.0
"""How far a request's timestamp may be from the agent's clock (either way)."""
MAX_NONCES = 100_000
"""Nonces remembered at most (a window's worth of requests); past it, requests wait (429)."""
NONCE_MAX_CHARS = 64
ON_HOST = "runs on the machine's host (its agent), not on an API replica"
UNREACHABLE_RETRY_S = 5.0
CONNECT_TIMEOUT_S = 5.0
POOL_TIMEOUT_S = 10.0
"""How long a relayed call waits for one of the replica's connections to the hosts."""
CALL_TIMEOUT_S = 30.0
"""A relayed call with no timeout of its own (signal, a console read)."""
ERROR_MAX_BYTES = 64 * 1024
ANSWER_MAX_BYTES = 6 * 2 * EXEC_OUTPUT_CAP + 64 * 1024
"""The largest answer read from a host: an exec's two capped outputs, each byte escaped in
JSON at worst as ``\\u00XX`` (6 characters)."""


# ---- the credential --------------------------------------------------------------------


def _mac(key: bytes, method: str, target: str, timestamp: str, nonce: str, body: bytes) -> str:
    message = "\n".join(
        (method.upper(), target, timestamp, nonce, hashlib.sha256(body).hexdigest())
    ).encode()
    return hmac.new(key, message, "sha256").hexdigest()


def _refused(reason: str) -> Unauthenticated:
    return Unauthenticated(f"relay: {reason}", field="credential")


class RelayCredential:
    """Signs (replica) and checks (agent) relayed requests with keys derived from the fleet's
    key: ``keys[0]`` signs, any of them checks (while the fleet's key rotates)."""

    def __init__(
        self,
        keys: Sequence[bytes],
        clock: Clock,
        *,
        max_skew_s: float = MAX_SKEW_S,
        max_nonces: int = MAX_NONCES,
    ) -> None:
        if not keys:
            raise ValueError("a relay credential needs a key")
        self._keys = list(keys)
        self._clock = clock
        self.max_skew_s = max_skew_s
        self.max_nonces = max_nonces
        self._seen: OrderedDict[str, float] = OrderedDict()
        """Nonces taken, with when they stop mattering (their timestamp + the skew)."""

    @classmethod
    def of(cls, sealer: Sealer, clock: Clock) -> RelayCredential:
        return cls(sealer.derived_keys(PURPOSE), clock)

    def sign(self, method: str, target: str, body: bytes) -> dict[str, str]:
        """The headers that authenticate one request (``target``: path and query, as sent)."""
        timestamp = f"{self._clock.now():.3f}"
        nonce = secrets.token_hex(16)
        signature = _mac(self._keys[0], method, target, timestamp, nonce, body)
        return {TIME_HEADER: timestamp, NONCE_HEADER: nonce, SIGNATURE_HEADER: signature}

    def check(self, method: str, target: str, body: bytes, headers: Mapping[str, str]) -> None:
        """Accept the request once, or raise ``Unauthenticated`` (``RateLimited`` when too
        many nonces are remembered)."""
        timestamp = headers.get(TIME_HEADER, "")
        nonce = headers.get(NONCE_HEADER, "")
        signature = headers.get(SIGNATURE_HEADER, "")
        if not (timestamp and nonce and signature):
            raise _refused("no credential")
        if len(nonce) > NONCE_MAX_CHARS:
            raise _refused("malformed credential")
        try:
            sent = float(timestamp)
        except ValueError:
            raise _refused("malformed credential") from None
        now = self._clock.now()
        if not math.isfinite(sent) or abs(now - sent) > self.max_skew_s:
            raise _refused(f"credential outside the {self.max_skew_s:g} s window")
        expected = (_mac(key, method, target, timestamp, nonce, body) for key in self._keys)
        if not any(hmac.compare_digest(mac, signature) for mac in expected):
            raise _refused("credential does not match")
        self._take(nonce, sent, now)

    def _take(self, nonce: str, sent: float, now: float) -> None:
        while self._seen:
            oldest, expires = next(iter(self._seen.items()))
            if expires > now:
                break
            del self._seen[oldest]
        if nonce in self._seen:
            raise _refused("credential already used")
        if len(self._seen) >= self.max_nonces:
            raise RateLimited(
                "relay: too many requests in the credential window",
                retry_after_s=1.0,
                action="relay",
            )
        self._seen[nonce] = sent + self.max_skew_s


# ---- the agent's side ------------------------------------------------------------------


def relayed_error_response(error: HangarError) -> JSONResponse:
    """Fly's error body, with the error's fields and whether to retry (for the replica)."""
    base = hangar_error_response(error)
    body = {
        "error": error.message,
        "status": error.code,
        "fields": json.loads(json.dumps(error.fields, default=str)),
        "retryable": error.retryable,
    }
    headers = {k: v for k, v in base.headers.items() if k.lower() in ("retry-after",)}
    return JSONResponse(body, status_code=error.http_status, headers=headers)


class RelayGuard:
    """ASGI middleware: the body read within the bounds, then the credential checked over
    it; the route sees the body as sent."""

    def __init__(
        self,
        app: ASGIApp,
        credential: RelayCredential,
        max_body_bytes: int,
        body_timeout_s: float,
    ) -> None:
        self.app = app
        self.credential = credential
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in scope.get("headers", [])
        }
        try:
            declared = int(headers.get("content-length", "0") or 0)
            if declared > self.max_body_bytes:
                raise too_large(self.max_body_bytes)
            body = await read_body(receive, self.max_body_bytes, self.body_timeout_s)
            target = scope.get("raw_path") or scope["path"].encode()
            if scope.get("query_string"):
                target += b"?" + scope["query_string"]
            self.credential.check(scope["method"], target.decode("latin-1"), body, headers)
        except HangarError as error:
            await relayed_error_response(error)(scope, receive, send)
            return
        except ValueError:
            await relayed_error_response(_refused("malformed request"))(scope, receive, send)
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


MACHINE = "/{app_name}/machines/{machine_id}"
GPU = "/{host_id}/gpus/{bdf}"


class RelayedRelease(BaseModel):
    """A GPU's release from quarantine, with who asked for it at the replica."""

    model_config = ConfigDict(extra="forbid")

    actor: Annotated[str, Field(min_length=1, max_length=256)]
    reason: Annotated[str, Field(min_length=1, max_length=512)]


def relay_app(machines: MachineService, volumes: VolumeService, hosts: HostService) -> FastAPI:
    """The guest operations a replica relays, each the host's own service call."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    install_error_handlers(app)

    @app.exception_handler(HangarError)
    async def _relayed(_request: Request, error: HangarError) -> JSONResponse:
        return relayed_error_response(error)

    @app.post(f"{PREFIX}{MACHINE}/exec")
    async def exec_in_machine(app_name: str, machine_id: str, body: ExecRequest) -> ExecResponse:
        return await machines.exec(app_name, machine_id, body)

    @app.get(f"{PREFIX}{MACHINE}/ps")
    async def machine_processes(
        app_name: str,
        machine_id: str,
        sort_by: str | None = Query(None, max_length=32),
        order: str | None = Query(None, max_length=8),
    ) -> list[ProcessStat]:
        return await machines.processes(app_name, machine_id, sort_by, order)

    @app.post(f"{PREFIX}{MACHINE}/signal")
    async def signal_machine(
        app_name: str, machine_id: str, body: SignalRequest, nonce: LeaseNonce = None
    ) -> OkResponse:
        await machines.signal(app_name, machine_id, body.signal, nonce)
        return OkResponse()

    @app.get(f"{PREFIX}{MACHINE}/logs")
    async def machine_logs(app_name: str, machine_id: str, follow: bool = False) -> Response:
        stream, slot = await machines.console(app_name, machine_id, follow)
        background = BackgroundTask(slot.release) if slot is not None else None
        return StreamingResponse(stream, media_type="text/plain", background=background)

    @app.post(f"{PREFIX}/{{app_name}}/volumes")
    async def create_volume(app_name: str, body: CreateVolumeRequest) -> VolumeView:
        return await volumes.create(app_name, body)

    @app.delete(f"{PREFIX}/{{app_name}}/volumes/{{volume_id}}")
    async def delete_volume(app_name: str, volume_id: str) -> VolumeView:
        return await volumes.delete(app_name, volume_id)

    @app.get(f"{HOSTS_PREFIX}{GPU}/events")
    async def gpu_events(host_id: str, bdf: str) -> list[GpuEvent]:
        return await hosts.gpu_events(host_id, bdf)

    @app.post(f"{HOSTS_PREFIX}{GPU}/release")
    async def release_quarantine(host_id: str, bdf: str, body: RelayedRelease) -> GpuView:
        return await hosts.release_quarantine(host_id, bdf, body.actor, body.reason)

    @app.put(f"{PREFIX}/{{app_name}}/volumes/{{volume_id}}/extend")
    async def extend_volume(
        app_name: str, volume_id: str, body: ExtendVolumeRequest
    ) -> ExtendVolumeResponse:
        return await volumes.extend(app_name, volume_id, body)

    @app.post(f"{PREFIX}/{{app_name}}/volumes/{{volume_id}}/snapshots")
    async def snapshot_volume(app_name: str, volume_id: str) -> VolumeSnapshotView:
        return await volumes.snapshot(app_name, volume_id)

    return app


def address_toward(endpoint: str) -> str:
    """The address this host reaches ``endpoint`` (a URL) from: where others on that network
    reach it. A UDP socket is connected, which sends nothing."""
    parts = urlsplit(endpoint if "//" in endpoint else f"http://{endpoint}")
    host = parts.hostname or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, parts.port or 2379))
        address: str = probe.getsockname()[0]
    return address


class RelayServer:
    """The agent's relay listener; ``url`` once started (what the host registers)."""

    def __init__(self, app: ASGIApp, address: str, port: int, settings: Settings) -> None:
        self.listener = http_server.Listener(
            app, address, port, http_server.ConnectionLimits.of(settings)
        )
        self.url = ""

    async def start(self) -> str:
        self.url = await self.listener.start()
        log.info("relay listening on %s", self.url)
        return self.url

    async def close(self) -> None:
        await self.listener.close()


def build_relay_server(
    settings: Settings,
    fleet: FleetStores,
    local: EmbeddedStores,
    agent: Agent,
    host: HostInfo,
    metrics: HangarMetrics,
) -> RelayServer | None:
    """The relay of a host's agent; None without the fleet's key (replicas then refuse its
    guests' operations with a 422 that says why)."""
    if fleet.sealer is None or fleet.secrets is None:
        log.warning(
            "no fleet key (HANGAR_ETCD_KEY_FILE): no relay, so API replicas cannot exec in, "
            "signal or read the console of machines on %s, nor make volumes there",
            host.id,
        )
        return None
    stores = ApiStores(
        fleet.machines,
        fleet.tenancy,
        fleet.volumes,
        local.runs,
        local.usage,
        fleet.claims,
        fleet.secrets,
        local.llm,
    )
    api = build_api(settings, agent.clock, stores, agent, host, metrics)
    guarded = RelayGuard(
        relay_app(api.services.machines, api.services.volumes, api.services.hosts),
        RelayCredential.of(fleet.sealer, agent.clock),
        settings.max_request_bytes,
        settings.header_timeout_s,
    )
    address = settings.relay_address or address_toward(settings.etcd[0])
    return RelayServer(guarded, address, settings.relay_port, settings)


# ---- the replica's side ----------------------------------------------------------------


class HostAnswered(HangarError):
    """An error a host's agent answered through the relay: its status, code, message and
    fields as the host had them."""

    def __init__(
        self,
        message: str,
        *,
        http_status: int,
        code: str,
        retryable: bool | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(message, retryable=retryable, **fields)
        self.http_status = http_status
        self.code = code


RESERVED_FIELDS = frozenset({"message", "retryable", "http_status", "code"})


def answered_error(host_id: str, status: int, body: bytes) -> HangarError:
    """The host's error answer as the error it was (a refused credential is this replica's
    fault, not the caller's: 502)."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        data = {"error": body[:200].decode(errors="replace")}
    message = str(data.get("error", f"host {host_id} answered {status}"))
    if status == 401:
        return BadGateway(
            f"host {host_id} refused this replica's relay credential ({message}): do they "
            "hold the same fleet key (HANGAR_ETCD_KEY_FILE)?",
            host_id=host_id,
        )
    fields = data.get("fields")
    kept = (
        {k: v for k, v in fields.items() if k not in RESERVED_FIELDS}
        if isinstance(fields, dict)
        else {}
    )
    retryable = data.get("retryable")
    return HostAnswered(
        message,
        http_status=status,
        code=str(data.get("status", "")) or "internal_error",
        retryable=retryable if isinstance(retryable, bool) else None,
        **kept,
    )


async def _read_capped(response: httpx.Response, limit: int, host_id: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise BadGateway(
                f"host {host_id} answered more than {limit} bytes", host_id=host_id, limit=limit
            )
        chunks.append(chunk)
    return b"".join(chunks)


GPU_EVENTS: TypeAdapter[list[GpuEvent]] = TypeAdapter(list[GpuEvent])


@dataclass(frozen=True)
class _Call:
    host_id: str
    app: str
    method: str
    path: str
    timeout_s: float | None
    body: bytes = b""
    params: Mapping[str, str] | None = None
    headers: Mapping[str, str] | None = None


class HostRelays:
    """The services' ``RemoteGuests`` on an API replica: each call to the relay of the host
    the machine (or volume) is on."""

    def __init__(
        self,
        monitor: HostMonitor,
        credential: RelayCredential,
        placer: FleetPlacer,
        fleet: FleetStores,
        region: str,
        max_connections: int,
    ) -> None:
        self._monitor = monitor
        self._credential = credential
        self._placer = placer
        self._fleet = fleet
        self._region = region
        self._max_connections = max_connections
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                limits=httpx.Limits(
                    max_connections=self._max_connections,
                    max_keepalive_connections=min(32, self._max_connections),
                ),
                trust_env=False,
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _base_url(self, host_id: str, app: str) -> str:
        record = self._monitor.get(host_id)
        if record is None:
            raise unreachable(host_id, app, "its agent's lease expired")
        if not record.address:
            raise Unprocessable(
                f"this {ON_HOST}, and host {host_id}'s agent runs no relay: it was started "
                "without the fleet's key (HANGAR_ETCD_KEY_FILE)",
                field="host",
                host_id=host_id,
            )
        return record.address.rstrip("/")

    async def _send(self, call: _Call) -> httpx.Response:
        """The host's answer, its status checked (an error is raised as the host's)."""
        client = self._http()
        timeout = httpx.Timeout(
            call.timeout_s, connect=CONNECT_TIMEOUT_S, pool=POOL_TIMEOUT_S, write=CALL_TIMEOUT_S
        )
        request = client.build_request(
            call.method,
            self._base_url(call.host_id, call.app) + call.path,
            content=call.body,
            params=dict(call.params) if call.params else None,
            headers={"content-type": "application/json", **(call.headers or {})},
            timeout=timeout,
        )
        target = request.url.raw_path.decode("ascii")
        request.headers.update(self._credential.sign(call.method, target, call.body))
        try:
            response = await client.send(request, stream=True)
        except httpx.PoolTimeout:
            raise ServiceUnavailable(
                f"this replica has {self._max_connections} calls open to the hosts; retry",
                app=call.app,
                reason="relay_busy",
                retry_after_s=1.0,
            ) from None
        except httpx.TransportError as error:
            raise unreachable(call.host_id, call.app, f"{type(error).__name__}") from None
        if response.status_code >= 400:
            try:
                body = await _read_capped(response, ERROR_MAX_BYTES, call.host_id)
            except httpx.TransportError as error:
                raise unreachable(call.host_id, call.app, type(error).__name__) from None
            finally:
                await response.aclose()
            raise answered_error(call.host_id, response.status_code, body)
        return response

    async def _json(self, call: _Call) -> Any:
        response = await self._send(call)
        try:
            body = await _read_capped(response, ANSWER_MAX_BYTES, call.host_id)
        except httpx.TransportError as error:
            raise unreachable(call.host_id, call.app, type(error).__name__) from None
        finally:
            await response.aclose()
        return json.loads(body)

    @staticmethod
    def _machine_path(machine: Machine, verb: str) -> str:
        app, machine_id = quote(machine.app, safe=""), quote(machine.id, safe="")
        return f"{PREFIX}/{app}/machines/{machine_id}/{verb}"

    async def exec(self, machine: Machine, request: ExecRequest) -> ExecResponse:
        waited = min(max(request.timeout_s(), 0.0), TIMEOUT_MAX_S) + TRANSFER_MARGIN_S
        body = json.dumps(request.model_dump(mode="json", exclude_unset=True)).encode()
        call = _Call(
            machine.host_id, machine.app, "POST", self._machine_path(machine, "exec"), waited, body
        )
        return ExecResponse.model_validate(await self._json(call))

    async def processes(
        self, machine: Machine, sort_by: str | None, order: str | None
    ) -> list[ProcessStat]:
        params = {k: v for k, v in (("sort_by", sort_by), ("order", order)) if v is not None}
        call = _Call(
            machine.host_id,
            machine.app,
            "GET",
            self._machine_path(machine, "ps"),
            PS_TIMEOUT_S + TRANSFER_MARGIN_S,
            params=params,
        )
        return [ProcessStat.model_validate(item) for item in await self._json(call)]

    async def signal(self, machine: Machine, signal: str, nonce: str | None) -> None:
        call = _Call(
            machine.host_id,
            machine.app,
            "POST",
            self._machine_path(machine, "signal"),
            CALL_TIMEOUT_S,
            json.dumps({"signal": signal}).encode(),
            headers={"fly-machine-lease-nonce": nonce} if nonce else None,
        )
        await self._json(call)

    async def console(self, machine: Machine, follow: bool) -> AsyncIterator[bytes]:
        call = _Call(
            machine.host_id,
            machine.app,
            "GET",
            self._machine_path(machine, "logs"),
            None if follow else CALL_TIMEOUT_S,  # a follower waits as long as the host does
            params={"follow": "true"} if follow else None,
        )
        response = await self._send(call)
        return _chunks(response, machine.host_id)

    def _volume_host(self, app: str, request: CreateVolumeRequest, region: str) -> tuple[str, str]:
        """Where the volume goes: its source's host for a fork or restore, else a host where
        a machine of ``compute`` (default: the smallest) fits now."""
        source_id = request.source_volume_id
        if source_id is None and request.snapshot_id is not None:
            source_id = next(
                (
                    v.id
                    for v in self._fleet.volumes.list_volumes(app)
                    if v.snapshot(request.snapshot_id)
                ),
                None,
            )
        if source_id is not None:
            source = self._fleet.volumes.get_volume(source_id)
            if source is None or source.app != app:
                raise NotFound(
                    f"volume {source_id} not found in app {app}", field="source_volume_id"
                )
            return source.host_id, source.region
        return self._placer.choose_host(region, request.compute or GuestConfig())

    async def create_volume(self, app: str, request: CreateVolumeRequest) -> VolumeView:
        region = request.region or self._region
        host_id, region = self._volume_host(app, request, region)
        sent = request.model_dump(mode="json", exclude_unset=True)
        sent["region"] = region
        call = _Call(
            host_id,
            app,
            "POST",
            f"{PREFIX}/{quote(app, safe='')}/volumes",
            RUN_WAIT_S + TRANSFER_MARGIN_S,
            json.dumps(sent).encode(),
        )
        return VolumeView.model_validate(await self._json(call))

    async def delete_volume(self, volume: Volume) -> VolumeView:
        call = _Call(
            volume.host_id,
            volume.app,
            "DELETE",
            f"{PREFIX}/{quote(volume.app, safe='')}/volumes/{quote(volume.id, safe='')}",
            2 * RUN_WAIT_S + TRANSFER_MARGIN_S,  # it may wait for a machine to let go first
        )
        return VolumeView.model_validate(await self._json(call))

    def _gpu_path(self, host_id: str, bdf: str, verb: str) -> str:
        return f"{HOSTS_PREFIX}/{quote(host_id, safe='')}/gpus/{quote(bdf, safe='')}/{verb}"

    async def gpu_events(self, host_id: str, bdf: str) -> list[GpuEvent]:
        call = _Call(host_id, "", "GET", self._gpu_path(host_id, bdf, "events"), CALL_TIMEOUT_S)
        return GPU_EVENTS.validate_python(await self._json(call))

    async def release_quarantine(self, host_id: str, bdf: str, actor: str, reason: str) -> GpuView:
        body = RelayedRelease(actor=actor, reason=reason).model_dump_json().encode()
        path = self._gpu_path(host_id, bdf, "release")
        call = _Call(host_id, "", "POST", path, CALL_TIMEOUT_S, body)
        return GpuView.model_validate(await self._json(call))

    def _volume_path(self, volume: Volume, verb: str) -> str:
        return f"{PREFIX}/{quote(volume.app, safe='')}/volumes/{quote(volume.id, safe='')}/{verb}"

    async def extend_volume(
        self, volume: Volume, request: ExtendVolumeRequest
    ) -> ExtendVolumeResponse:
        call = _Call(
            volume.host_id,
            volume.app,
            "PUT",
            self._volume_path(volume, "extend"),
            RUN_WAIT_S + TRANSFER_MARGIN_S,
            request.model_dump_json().encode(),
        )
        return ExtendVolumeResponse.model_validate(await self._json(call))

    async def snapshot_volume(self, volume: Volume) -> VolumeSnapshotView:
        call = _Call(
            volume.host_id,
            volume.app,
            "POST",
            self._volume_path(volume, "snapshots"),
            RUN_WAIT_S + TRANSFER_MARGIN_S,
        )
        return VolumeSnapshotView.model_validate(await self._json(call))


def unreachable(host_id: str, app: str, why: str) -> ServiceUnavailable:
    return ServiceUnavailable(
        f"host {host_id} is unreachable ({why}); retry later",
        app=app,
        reason="host_unreachable",
        host_id=host_id,
        retry_after_s=UNREACHABLE_RETRY_S,
    )


async def _chunks(response: httpx.Response, host_id: str) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    except (httpx.TransportError, asyncio.CancelledError) as error:
        log.info("console from host %s ended early: %s", host_id, type(error).__name__)
        if isinstance(error, asyncio.CancelledError):
            raise
    finally:
        await response.aclose()
