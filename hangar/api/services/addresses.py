"""Private addresses: each org's number in its private network (assigned once, kept in the
tenancy store), and a machine's address on this host from it (``hangar.net.addressing``)."""

from __future__ import annotations

from hangar.agent.network import MachineNetwork
from hangar.errors import Conflict, NotFound, StoreError
from hangar.store.protocol import MachineStore, TenancyStore

ASSIGN_ATTEMPTS = 8


class PrivateAddresses:
    def __init__(
        self, machines: MachineStore, tenancy: TenancyStore, network: MachineNetwork
    ) -> None:
        self._machines = machines
        self._tenancy = tenancy
        self._network = network

    def org_number(self, org_slug: str) -> int:
        for _ in range(ASSIGN_ATTEMPTS):
            taken = self._tenancy.network_numbers()
            held = [number for number, slug in taken.items() if slug == org_slug]
            if held:
                return held[0]
            wanted = self._network.net.plan.org_number(org_slug, taken)
            try:
                return self._tenancy.assign_network_number(org_slug, wanted)
            except Conflict:
                continue  # another org took it meanwhile: probe past it
        raise StoreError(f"no network number could be assigned to org {org_slug}", org=org_slug)

    def for_machine(self, app_name: str, machine_id: str) -> str:
        app = self._machines.get_app(app_name)
        if app is None:
            raise NotFound(f"app {app_name} not found", app=app_name)
        return self._network.private_ip(self.org_number(app.org_slug), machine_id)
