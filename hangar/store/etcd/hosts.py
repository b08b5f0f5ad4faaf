"""Hosts in the fleet: each agent registers its host under a lease it keeps alive; the API side
watches the registrations and knows which hosts are reachable.

``HostLease`` (agent side) writes ``{prefix}/hosts/{host_id}`` (a ``HostRecord``: the host, the
agent's address, its GPUs) attached to a lease of ``ttl_s`` seconds and refreshes the lease
every ``ttl_s / 3`` from a background thread. If the agent is cut off from etcd for longer than
the TTL, etcd deletes the key; when the agent gets through again it finds its lease gone and
registers afresh under a new one.

``HostMonitor`` (API side) keeps every registration in a watch-fed ``PrefixCache``: a host whose
key is there is ``ok``; one whose lease expired (agent dead, host down, partition) is deleted by
etcd and its deletion reaches the monitor by the watch, at most about a second after the TTL
(etcd checks leases every 500 ms). Machines on such a host show ``host_status: unreachable``.
The monitor's answers come from memory, so they keep coming while etcd is unavailable (as of
the last revision seen; ``connected`` says whether the watch is live).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Self

from pydantic import BaseModel, Field

from hangar.errors import StoreError, StoreUnavailable
from hangar.model.gpu import GpuRecord
from hangar.model.host import HostInfo
from hangar.store.etcd.cache import CacheChange, PrefixCache
from hangar.store.etcd.client import EtcdClient, KeyValue
from hangar.store.etcd.keys import KeyLayout

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 10
MIN_TTL_S = 2
"""etcd refuses to expire a lease sooner than 1.5 election timeouts (1.5 s by default)."""


class HostStatus(enum.StrEnum):
    """Fly's ``host_status`` of a machine: is the host it runs on answering?"""

    OK = "ok"
    UNREACHABLE = "unreachable"


class HostRecord(BaseModel):
    """What an agent publishes about its host while it is alive."""

    host: HostInfo
    address: str = ""
    """Where the agent answers (URL), for the API to reach it."""
    gpus: list[GpuRecord] = Field(default_factory=list)
    started_at: float = 0.0
    zone: str = ""
    pool: str = "general"
    free_cpu_milli: int = 0
    free_memory_mb: int = 0
    free_gpus: int = 0
    """What is free on the host, as its claim record said when the agent last published."""
    net_host_number: int | None = None
    """The host's number in private addresses (None: the agent runs no private network)."""
    underlay: str = ""
    """Where the other hosts route the private prefixes this host holds (empty: nowhere)."""


class HostLease:
    """Keeps one host registered while the agent runs. ``start`` registers (raising
    ``StoreUnavailable`` if etcd cannot be reached); ``stop`` revokes the lease (the host goes
    at once) or, with ``revoke=False``, just stops refreshing it (the host goes after the TTL,
    as if the agent had died)."""

    def __init__(
        self,
        client: EtcdClient,
        record: HostRecord,
        layout: KeyLayout | None = None,
        *,
        ttl_s: int = DEFAULT_TTL_S,
    ) -> None:
        if ttl_s < MIN_TTL_S:
            raise ValueError(f"a host lease lives at least {MIN_TTL_S} s")
        self._client = client
        self._layout = layout or KeyLayout()
        self._key = self._layout.host(record.host.id)
        self._record = record
        self.ttl_s = ttl_s
        self.lease_id = 0
        self.registrations = 0
        """Leases taken to register the host (1 unless a lease was lost)."""
        self.alive = False
        """The last refresh reached etcd and the lease was still there."""
        self.refreshes = 0
        self._refreshed = threading.Condition()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def record(self) -> HostRecord:
        return self._record

    def start(self) -> Self:
        self._register()
        self._thread = threading.Thread(
            target=self._keep_alive, name=f"lease {self._record.host.id}", daemon=True
        )
        self._thread.start()
        return self

    def wait_refreshes(self, count: int, timeout_s: float) -> bool:
        """Wait (bounded) until the lease has been refreshed ``count`` times."""
        with self._refreshed:
            return self._refreshed.wait_for(lambda: self.refreshes >= count, timeout_s)

    def update(self, record: HostRecord) -> None:
        """Publish a new record (inventory or capacity changed) under the same lease."""
        if record.host.id != self._record.host.id:
            raise ValueError("a host lease publishes one host")
        with self._lock:
            self._record = record
            self._client.put(self._key, self._encoded(), lease=self.lease_id)

    def stop(self, *, revoke: bool = True) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=self._client.timeout_s + 1.0)
            self._thread = None
        if revoke and self.lease_id:
            try:
                self._client.revoke_lease(self.lease_id)
            except StoreUnavailable as error:
                log.warning("host %s: lease not revoked (%s); it expires", self._key, error)
        self.alive = False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _encoded(self) -> bytes:
        return self._record.model_dump_json().encode()

    def _register(self) -> None:
        with self._lock:
            lease = self._client.grant_lease(self.ttl_s)
            self.lease_id = lease.id
            self.registrations += 1
            self._client.put(self._key, self._encoded(), lease=lease.id)
            self.alive = True

    def _keep_alive(self) -> None:
        interval = self.ttl_s / 3
        while not self._stopped.wait(interval):
            try:
                if self._client.keep_alive(self.lease_id) > 0:
                    self.alive = True
                    with self._refreshed:
                        self.refreshes += 1
                        self._refreshed.notify_all()
                    continue
                log.warning(
                    "host %s: lease %x expired; registering again", self._key, self.lease_id
                )
                self._register()
            except StoreError as error:
                self.alive = False
                log.warning("host %s: lease not refreshed: %s", self._key, error)


def decode_host_record(kv: KeyValue) -> HostRecord:
    return HostRecord.model_validate_json(kv.value)


class HostMonitor:
    """Which hosts are registered now. ``on_change(host_id, status)`` is called from the watch
    thread whenever a host comes or goes."""

    def __init__(
        self,
        client: EtcdClient,
        layout: KeyLayout | None = None,
        *,
        on_change: Callable[[str, HostStatus], None] | None = None,
    ) -> None:
        self._layout = layout or KeyLayout()
        self._on_change = on_change
        self._cache: PrefixCache[HostRecord] = PrefixCache(
            client, self._layout.hosts, decode_host_record, on_change=self._changed
        )

    def start(self) -> Self:
        self._cache.start()
        return self

    def close(self) -> None:
        self._cache.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._cache.connected

    def hosts(self) -> dict[str, HostRecord]:
        return self._cache.snapshot()

    def get(self, host_id: str) -> HostRecord | None:
        return self._cache.get(host_id)

    def status(self, host_id: str) -> HostStatus:
        return HostStatus.OK if self._cache.get_kv(host_id) is not None else HostStatus.UNREACHABLE

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Wait (bounded) until ``predicate`` holds; checked after every change seen."""
        return self._cache.wait_until(predicate, timeout_s)

    def wait_status(self, host_id: str, status: HostStatus, timeout_s: float) -> float | None:
        """Wait (bounded) until ``host_id`` has ``status``; seconds waited, or None if it never
        did in ``timeout_s``."""
        started = time.monotonic()
        reached = self._cache.wait_until(lambda: self.status(host_id) is status, timeout_s)
        return time.monotonic() - started if reached else None

    def _changed(self, changes: Sequence[CacheChange]) -> None:
        if self._on_change is None:
            return
        for change in changes:
            status = HostStatus.UNREACHABLE if change.deleted else HostStatus.OK
            try:
                self._on_change(change.name, status)
            except Exception:
                log.exception("host monitor: a listener failed on %s", change.name)
