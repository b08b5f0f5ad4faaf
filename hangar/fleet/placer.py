"""Placement across the fleet: the same ``Scheduler`` the single host uses, over the etcd claim
store, seeing only hosts whose agent holds its lease and that no operator cordoned.

A launching machine's claim is taken here, by the API replica, at create: CPUs, memory and GPUs
in one compare-and-set on the chosen host's claim record, so of two replicas racing for the
last GPU exactly one wins and the other answers 422 at once. The host's agent then finds the
claim in place when it starts the machine (``HostPlacement.place`` keeps a held claim). A
machine created with ``skip_launch`` only gets a host (``Scheduler.choose``): its agent claims
when it starts it. GPU machines land only on GPU hosts, and CPU machines on a GPU host
only where its agent allows them (``--pool``): the scheduler's pool rules.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

from hangar.model.config import GuestConfig, MachineConfig
from hangar.scheduler import ClaimStore, HostState, Scheduler, VersionedHost
from hangar.scheduler.machines import placement_request
from hangar.store.etcd.hosts import HostMonitor, HostStatus


class ReachableClaims:
    """A claim store showing the scheduler only the hosts ``usable`` accepts."""

    def __init__(self, store: ClaimStore, usable: Callable[[str], bool]) -> None:
        self._store = store
        self._usable = usable

    def put_host(self, host: HostState) -> VersionedHost:
        return self._store.put_host(host)

    def snapshot(self) -> Mapping[str, VersionedHost]:
        return {
            host_id: record
            for host_id, record in self._store.snapshot().items()
            if self._usable(host_id)
        }

    def read_host(self, host_id: str) -> VersionedHost | None:
        return self._store.read_host(host_id) if self._usable(host_id) else None

    def compare_and_set(self, host_id: str, expected_version: int, new_state: HostState) -> bool:
        return self._store.compare_and_set(host_id, expected_version, new_state)


class FleetPlacer:
    """A ``MachinePlacer`` for an API replica. Thread-safe (one scheduler behind a lock)."""

    def __init__(
        self,
        claims: ClaimStore,
        monitor: HostMonitor,
        cordoned: Callable[[str], bool] = lambda _host: False,
    ) -> None:
        self._claims = claims
        self._monitor = monitor
        self._cordoned = cordoned
        self._visible = ReachableClaims(claims, self._usable)
        self._lock = threading.Lock()
        self._scheduler: Scheduler | None = None

    def _usable(self, host_id: str) -> bool:
        return self._monitor.status(host_id) is HostStatus.OK and not self._cordoned(host_id)

    def _fresh_scheduler(self) -> Scheduler:
        if self._scheduler is None:
            self._scheduler = Scheduler(self._visible)
        else:
            self._scheduler.refresh()  # hosts that came, went or were cordoned since
        return self._scheduler

    def place(
        self,
        machine_id: str,
        region: str | None,
        config: MachineConfig,
        launching: bool,
        host_id: str | None = None,
    ) -> tuple[str, str]:
        request = placement_request(
            config.guest, region or "", machine_id=machine_id, host_id=host_id or ""
        )
        with self._lock:
            scheduler = self._fresh_scheduler()
            if not launching:
                return scheduler.choose(request)
            placement = scheduler.place(request)
        return placement.host_id, placement.region

    def choose_host(self, region: str, guest: GuestConfig) -> tuple[str, str]:
        """A reachable, uncordoned host where a machine of ``guest`` fits now (claiming
        nothing): where a new volume for such machines goes; (host id, region)."""
        with self._lock:
            return self._fresh_scheduler().choose(placement_request(guest, region))

    def release(self, host_id: str, machine_id: str) -> None:
        with self._lock:
            self._fresh_scheduler().release(host_id, machine_id)

    def host_status(self, host_id: str) -> str:
        return str(self._monitor.status(host_id))
