"""A watch on an etcd key range that survives lost members and compaction.

The gateway streams a watch as newline-separated JSON answers on one long POST to
``/v3/watch``. ``Watch`` reads that stream on a background thread and hands each batch of
events, in revision order, to ``on_events``. When the stream ends (member stopped, connection
lost, member without a leader: the request carries ``hasleader``, so etcd cancels it once the
member loses its leader), the watch starts again on the next member from the revision after
the last one delivered, so no event is lost or repeated. When that revision has been compacted
away, ``on_compacted`` reloads the range and says where to resume. Reconnects back off from
``RETRY_MIN_S`` to ``RETRY_MAX_S`` and stop when ``stop`` is called.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from hangar.store.etcd.client import (
    JSON_HEADERS,
    REQUIRE_LEADER,
    EtcdClient,
    KeyValue,
    encode_bytes,
    prefix_end,
)

log = logging.getLogger(__name__)

RETRY_MIN_S = 0.05
RETRY_MAX_S = 1.0
KEEPALIVE_IDLE_S = 5
KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_PROBES = 3


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    kv: KeyValue
    """For a delete: the key and the deleting revision (``mod_revision``), no value."""


class WatchCompacted(Exception):
    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"watch revision compacted (oldest kept: {compact_revision})")
        self.compact_revision = compact_revision


class _StreamEnded(Exception):
    pass


class Watch:
    def __init__(
        self,
        client: EtcdClient,
        key: str,
        *,
        start_revision: int,
        on_events: Callable[[Sequence[WatchEvent]], None],
        on_compacted: Callable[[int], int],
        prefix: bool = True,
        on_connected: Callable[[bool], None] | None = None,
        name: str = "etcd-watch",
    ) -> None:
        self._client = client
        self._key = key
        self._prefix = prefix
        self.next_revision = start_revision
        self._on_events = on_events
        self._on_compacted = on_compacted
        self._on_connected = on_connected
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._connection: http.client.HTTPConnection | None = None
        self._connected = False
        self._created = False
        self.reconnects = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def connected(self) -> bool:
        return self._connected

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopped.set()
        with self._lock:  # the stream closes its connection only after taking the lock
            connection = self._connection
            sock = connection.sock if connection is not None else None
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        backoff = RETRY_MIN_S
        position = 0
        while not self._stopped.is_set():
            endpoint = self._client.endpoints[position % len(self._client.endpoints)]
            self._created = False
            try:
                self._stream(endpoint.host, endpoint.port)
            except WatchCompacted as compacted:
                try:
                    self.next_revision = self._on_compacted(compacted.compact_revision)
                    continue
                except Exception as error:
                    log.warning("watch %s: reload after compaction failed: %s", self._key, error)
            except (OSError, http.client.HTTPException, ValueError, _StreamEnded) as error:
                if not self._stopped.is_set():
                    log.info("watch %s on %s ended: %s", self._key, endpoint.url, error)
            except Exception:
                log.exception(
                    "watch %s: a consumer failed; resuming from %d", self._key, self.next_revision
                )
            self._set_connected(False)
            position += 1
            if self._created:
                backoff = RETRY_MIN_S
            if self._stopped.wait(backoff):
                break
            backoff = min(RETRY_MAX_S, backoff * 2)
            self.reconnects += 1
        self._set_connected(False)

    def _stream(self, host: str, port: int) -> None:
        connection = http.client.HTTPConnection(host, port, timeout=self._client.connect_timeout_s)
        with self._lock:
            if self._stopped.is_set():
                return
            self._connection = connection
        try:
            connection.connect()
            sock = connection.sock
            assert sock is not None
            _keep_alive(sock)
            sock.settimeout(None)  # wait for events as long as it takes; ``stop`` shuts it
            create: dict[str, Any] = {
                "key": encode_bytes(self._key),
                "start_revision": str(self.next_revision),
                "progress_notify": True,
            }
            if self._prefix:
                create["range_end"] = encode_bytes(prefix_end(self._key).encode("latin-1"))
            body = json.dumps({"create_request": create}).encode()
            connection.request("POST", "/v3/watch", body, {**JSON_HEADERS, **REQUIRE_LEADER})
            response = connection.getresponse()
            if response.status != 200:
                raise _StreamEnded(f"HTTP {response.status}: {response.read()[:200]!r}")
            while not self._stopped.is_set():
                line = response.readline()
                if not line:
                    raise _StreamEnded("stream closed")
                if line.strip():
                    self._handle(json.loads(line))
        finally:
            with self._lock:
                self._connection = None
            connection.close()

    def _handle(self, message: dict[str, Any]) -> None:
        if "error" in message:
            error = message["error"]
            raise _StreamEnded(
                str(error.get("message", error) if isinstance(error, dict) else error)
            )
        result = message.get("result", {})
        if result.get("canceled"):
            compacted = int(result.get("compact_revision", 0))
            if compacted:
                raise WatchCompacted(compacted)
            raise _StreamEnded(f"canceled: {result.get('cancel_reason', '')}")
        if result.get("created"):
            self._created = True
            self._set_connected(True)
            return
        raw_events = result.get("events", ())
        if not raw_events:  # a progress notice: every event up to this revision was sent
            revision = int(result.get("header", {}).get("revision", 0))
            self.next_revision = max(self.next_revision, revision + 1)
            return
        events = [
            WatchEvent(
                "delete" if raw.get("type") == "DELETE" else "put", KeyValue.from_json(raw["kv"])
            )
            for raw in raw_events
        ]
        self._on_events(events)
        self.next_revision = events[-1].kv.mod_revision + 1

    def _set_connected(self, connected: bool) -> None:
        if connected != self._connected:
            self._connected = connected
            if connected:
                log.debug("watch %s connected from revision %d", self._key, self.next_revision)
            if self._on_connected is not None:
                self._on_connected(connected)


def _keep_alive(sock: socket.socket) -> None:
    """Notice a member that vanished without closing the connection (host down, partition)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
