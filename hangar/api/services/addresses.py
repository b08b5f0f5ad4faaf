"""Private addresses: each org's number in its private network (assigned once, kept in the
tenancy store), and a machine's address from it and from the number of the host it is placed
on (``hangar.net.addressing``): the host's own on one host, the placed host's in a fleet."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv6Address

from hangar.errors import Conflict, NotFound, StoreError
from hangar.net.addressing import AddressPlan
from hangar.store.protocol import MachineStore, TenancyStore

ASSIGN_ATTEMPTS = 8


class PrivateAddresses:
    def __init__(
        self,
        machines: MachineStore,
        tenancy: TenancyStore,
        plan: AddressPlan,
        host_number_of: Callable[[str], int],
    ) -> None:
        """``host_number_of(host_id)``: the number the host holds in private addresses."""
        self._machines = machines
        self._tenancy = tenancy
        self._plan = plan
        self._host_number_of = host_number_of

    def org_number(self, org_slug: str) -> int:
        for _ in range(ASSIGN_ATTEMPTS):
            taken = self._tenancy.network_numbers()
            held = [number for number, slug in taken.items() if slug == org_slug]
            if held:
                return held[0]
            wanted = self._plan.org_number(org_slug, taken)
            try:
                return self._tenancy.assign_network_number(org_slug, wanted)
            except Conflict:
                continue  # another org took it meanwhile: probe past it
        raise StoreError(f"no network number could be assigned to org {org_slug}", org=org_slug)

    def for_machine(self, app_name: str, machine_id: str, host_id: str) -> str:
        """The ``private_ip`` of machine ``machine_id`` of ``app_name`` on host ``host_id``."""
        app = self._machines.get_app(app_name)
        if app is None:
            raise NotFound(f"app {app_name} not found", app=app_name)
        address: IPv6Address = self._plan.machine_address(
            self.org_number(app.org_slug), self._host_number_of(host_id), machine_id
        )
        return str(address)
