"""A fleet host's side of the private network that spans the fleet's hosts.

Each host holds one ``/64`` of every org it runs machines of (``hangar.net.addressing``), and
guests have only their ``/64`` on-link: a packet to a machine of their org on another host goes
to their gateway, this host, which routes it over the underlay (the network between hosts) to
the host holding that ``/64``. So each agent keeps, from etcd:

- its peers: the other registered hosts' underlay addresses (their lease registrations);
- one route per org-on-host ``/64`` that a machine on another host holds, via that host;
- its DNS service and proxy told of every machine's change (``notify``), on every host.

The isolation rules are the single host's (``hangar.net.firewall``): routed between hosts, a
packet passes only within one org's prefix; the other hosts themselves (their proxies and
checks) may open connections to guests. Reads come from two watched caches (machine records,
host registrations), so a change costs one recomputation here, never a read of etcd. The
underlay is the operator's network between hosts: it is trusted as the hosts' own network is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from ipaddress import IPv6Address, IPv6Network

from hangar.agent.network import MachineNetwork
from hangar.errors import HangarError
from hangar.fleet.stores import FleetStores
from hangar.model.machine import Machine
from hangar.net.addressing import HOST_PREFIX_LEN
from hangar.net.links import PeerRoute
from hangar.store.etcd.cache import CacheChange, PrefixCache
from hangar.store.etcd.client import KeyValue
from hangar.store.etcd.hosts import HostMonitor, HostRecord, HostStatus
from hangar.store.etcd.keys import unsegment

log = logging.getLogger(__name__)

RETRY_S = 1.0
"""After a failed update of routes or rules, the next try (a change also triggers one)."""


def _decode_machine(kv: KeyValue) -> Machine:
    return Machine.model_validate_json(kv.value)


def fleet_routes(
    host_id: str, machines: Sequence[Machine], hosts: dict[str, HostRecord]
) -> tuple[frozenset[IPv6Address], frozenset[PeerRoute]]:
    """The peers and routes host ``host_id`` needs: every other registered host that has an
    underlay, and the ``/64`` of each machine with an address on one of them."""
    underlays: dict[str, IPv6Address] = {}
    for other, record in hosts.items():
        if other == host_id or not record.underlay:
            continue
        with contextlib.suppress(ValueError):
            underlays[other] = IPv6Address(record.underlay)
    routes = {
        PeerRoute(
            IPv6Network(f"{machine.private_ip}/{HOST_PREFIX_LEN}", strict=False),
            underlays[machine.host_id],
        )
        for machine in machines
        if machine.private_ip and machine.host_id in underlays
    }
    return frozenset(underlays.values()), frozenset(routes)


class FleetNetwork:
    """Keeps this host's peers, peer routes and DNS current with the fleet's records."""

    def __init__(
        self,
        fleet: FleetStores,
        host_id: str,
        network: MachineNetwork,
        notify: Callable[[str | None], None],
    ) -> None:
        """``notify(machine_id)``: the agent's change notice (its DNS service, its proxy's
        view and ``wait`` read the machine again)."""
        self._host_id = host_id
        self._network = network
        self._notify = notify
        self._machines: PrefixCache[Machine] = PrefixCache(
            fleet.client,
            fleet.layout.records("machines"),
            _decode_machine,
            on_change=self._machines_changed,
        )
        self._hosts = HostMonitor(fleet.client, fleet.layout, on_change=self._host_changed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.applied: tuple[frozenset[IPv6Address], frozenset[PeerRoute]] | None = None
        """The peers and routes last made current (None: not yet)."""

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._hosts.start)
        await asyncio.to_thread(self._machines.start)
        self._dirty.set()
        self._task = asyncio.create_task(self._keep_current())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.to_thread(self._machines.close)
        await asyncio.to_thread(self._hosts.close)

    # watch threads
    def _wake(self, machine_ids: Sequence[str | None]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        def on_loop() -> None:
            for machine_id in machine_ids:
                self._notify(machine_id)
            self._dirty.set()

        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(on_loop)

    def _machines_changed(self, changes: Sequence[CacheChange]) -> None:
        # A record's name is ``app/machine_id``, each segment encoded.
        ids = [unsegment(change.name.rstrip("/").rsplit("/", 1)[-1]) for change in changes]
        self._wake(list(dict.fromkeys(ids)))

    def _host_changed(self, _host_id: str, _status: HostStatus) -> None:
        self._wake([])

    # the loop's side
    def wanted(self) -> tuple[frozenset[IPv6Address], frozenset[PeerRoute]]:
        machines = list(self._machines.snapshot().values())
        return fleet_routes(self._host_id, machines, self._hosts.hosts())

    async def _keep_current(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            wanted = self.wanted()
            if wanted == self.applied:
                continue
            try:
                await self._network.set_fleet(*wanted)
            except HangarError as error:
                log.warning("fleet network not current yet: %s", error)
                await asyncio.sleep(RETRY_S)
                self._dirty.set()
                continue
            self.applied = wanted
            log.info("fleet network: %d peer(s), %d route(s)", len(wanted[0]), len(wanted[1]))
