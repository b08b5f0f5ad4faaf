"""The claim seam: what the scheduler needs from a store to claim resources atomically.

A store keeps one ``HostState`` per host with a version. Placing a machine is one
compare-and-set of that host's record: two schedulers racing for the last GPU read the same
version, and only the first write succeeds. Backends: ``InMemoryClaimStore`` here (tests and
benchmarks); SQLite (a version column) and etcd (the key's ``version`` in a transaction
compare) implement the same protocol in ``hangar.store``.

A store may also write many hosts in one round trip (``BatchClaimStore``: etcd sends one
transaction holding one compare-and-set per host); ``compare_and_set_many`` uses that when the
store has it and one call per host otherwise.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from hangar.scheduler.model import HostState


@dataclass(frozen=True, slots=True)
class VersionedHost:
    state: HostState
    version: int


class ClaimStore(Protocol):
    def put_host(self, host: HostState) -> VersionedHost:
        """Add or replace a host unconditionally (its first registration), bumping its
        version."""
        ...

    def snapshot(self) -> Mapping[str, VersionedHost]:
        """Every host, each with the version its state was read at."""
        ...

    def read_host(self, host_id: str) -> VersionedHost | None: ...

    def compare_and_set(self, host_id: str, expected_version: int, new_state: HostState) -> bool:
        """Write ``new_state`` if the host is still at ``expected_version``; on success its
        version becomes ``expected_version + 1``. False (nothing written) otherwise."""
        ...


ClaimWrite = tuple[str, int, HostState]
"""One compare-and-set: host id, the version it was read at, the state to write."""


@runtime_checkable
class BatchClaimStore(ClaimStore, Protocol):
    def compare_and_set_many(self, writes: Sequence[ClaimWrite]) -> list[bool]:
        """Each write as ``compare_and_set`` would do it (each wins or loses alone), in one
        round trip; the hosts must differ. One answer per write, in order."""
        ...


def compare_and_set_many(store: ClaimStore, writes: Sequence[ClaimWrite]) -> list[bool]:
    hosts = [host_id for host_id, _, _ in writes]
    if len(set(hosts)) != len(hosts):
        raise ValueError("one write per host in a batch")
    if isinstance(store, BatchClaimStore):
        return store.compare_and_set_many(writes)
    return [store.compare_and_set(*write) for write in writes]


class InMemoryClaimStore:
    """A thread-safe ``ClaimStore`` in a dict."""

    def __init__(self, hosts: Iterable[HostState] = ()) -> None:
        self._lock = threading.Lock()
        self._hosts: dict[str, VersionedHost] = {}
        for host in hosts:
            self.put_host(host)

    def put_host(self, host: HostState) -> VersionedHost:
        """Add or replace a host unconditionally (inventory registration), bumping its version."""
        with self._lock:
            previous = self._hosts.get(host.id)
            record = VersionedHost(host, previous.version + 1 if previous else 1)
            self._hosts[host.id] = record
            return record

    def snapshot(self) -> Mapping[str, VersionedHost]:
        with self._lock:
            return dict(self._hosts)

    def read_host(self, host_id: str) -> VersionedHost | None:
        with self._lock:
            return self._hosts.get(host_id)

    def compare_and_set(self, host_id: str, expected_version: int, new_state: HostState) -> bool:
        if new_state.id != host_id:
            raise ValueError(f"state of host {new_state.id} written under {host_id}")
        with self._lock:
            current = self._hosts.get(host_id)
            if current is None or current.version != expected_version:
                return False
            self._hosts[host_id] = VersionedHost(new_state, expected_version + 1)
            return True
