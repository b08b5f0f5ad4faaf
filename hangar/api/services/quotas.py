"""Per-org quotas over the machines an org has (every machine not destroyed counts):
machines, memory, and GPUs by kind. A request that would pass one gets a 422 naming it.

A machine with updates still pending (queued or running in the agent) counts with the
largest of its configs, current and pending, for each resource: an update waiting behind a
stop must not leave room that it will take back when it lands.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, Field

from hangar.errors import QuotaExceeded
from hangar.model.config import GuestConfig, MachineConfig
from hangar.model.machine import Machine
from hangar.model.run import UpdateRequest
from hangar.store.protocol import MachineStore, OrgQuotas, RunStore, TenancyStore


class OrgUsage(BaseModel):
    machines: int = 0
    memory_mb: int = 0
    gpus: dict[str, int] = Field(default_factory=dict)

    def add(self, config: MachineConfig, sign: int = 1) -> None:
        self.add_largest([config], sign)

    def add_largest(self, configs: Sequence[MachineConfig], sign: int = 1) -> None:
        """One machine that has had, or will have, each of ``configs``: the largest of them
        for each resource."""
        self.machines += sign
        self.memory_mb += sign * max(config.guest.memory_mb for config in configs)
        largest: dict[str, int] = {}
        for config in configs:
            kind, count = config.guest.gpu_kind, config.guest.gpus or 0
            if kind is not None and count:
                largest[kind] = max(largest.get(kind, 0), count)
        for kind, count in largest.items():
            self.gpus[kind] = self.gpus.get(kind, 0) + sign * count


def room_for(quotas: OrgQuotas, usage: OrgUsage, guest: GuestConfig) -> int | None:
    """How many more machines of ``guest``'s shape fit in ``quotas`` (None: no limit)."""
    rooms: list[int] = []
    if quotas.machines is not None:
        rooms.append(quotas.machines - usage.machines)
    if quotas.memory_mb is not None:
        rooms.append((quotas.memory_mb - usage.memory_mb) // guest.memory_mb)
    kind, count = guest.gpu_kind, guest.gpus or 0
    if kind is not None and count and kind in quotas.gpus:
        rooms.append((quotas.gpus[kind] - usage.gpus.get(kind, 0)) // count)
    return max(0, min(rooms)) if rooms else None


class QuotaService:
    def __init__(
        self, cluster: MachineStore, tenancy: TenancyStore, runs: RunStore | None = None
    ) -> None:
        self._cluster = cluster
        self._tenancy = tenancy
        self._runs = runs

    def _pending_configs(self) -> dict[str, list[MachineConfig]]:
        """Machine id -> the configs of its updates not finished yet."""
        pending: dict[str, list[MachineConfig]] = {}
        if self._runs is None:
            return pending
        for run in self._runs.list_runs(unfinished_only=True):
            if isinstance(run.request, UpdateRequest):
                pending.setdefault(run.machine_id, []).append(run.request.config)
        return pending

    def _configs_of(
        self, machine: Machine, pending: dict[str, list[MachineConfig]]
    ) -> list[MachineConfig]:
        return [machine.config, *pending.get(machine.id, [])]

    def usage(self, org_slug: str) -> OrgUsage:
        usage = OrgUsage()
        pending = self._pending_configs()
        for app in self._cluster.list_apps(org_slug):
            for machine in self._cluster.list_machines(app.name):
                usage.add_largest(self._configs_of(machine, pending))
        return usage

    def room(self, org_slug: str, guest: GuestConfig) -> int | None:
        org = self._tenancy.get_org(org_slug)
        if org is None:
            return 0
        return room_for(org.quotas, self.usage(org_slug), guest)

    def check(self, app_name: str, config: MachineConfig, replacing: Machine | None = None) -> None:
        """Raise QuotaExceeded if the app's org cannot take a machine with ``config`` (in place
        of ``replacing``, for an update). Only what the request grows is checked, so an org over
        a lowered quota can still shrink or keep its machines. The caller creates nothing until
        this returns, and does so without yielding to the event loop in between, so concurrent
        requests cannot both pass on the same room."""
        app = self._cluster.get_app(app_name)
        org = self._tenancy.get_org(app.org_slug) if app is not None else None
        if org is None:
            return
        before = self.usage(org.slug)
        after = before.model_copy(deep=True)
        if replacing is None:
            after.add(config)
        else:
            configs = self._configs_of(replacing, self._pending_configs())
            after.add_largest(configs, sign=-1)
            after.add_largest([*configs, config])
        quotas = org.quotas
        limits: list[tuple[str, int | None, int, int, str]] = [
            ("machines", quotas.machines, before.machines, after.machines, "machine(s)"),
            ("memory_mb", quotas.memory_mb, before.memory_mb, after.memory_mb, "MB of memory"),
        ]
        limits += [
            (
                f"gpus.{kind}",
                limit,
                before.gpus.get(kind, 0),
                after.gpus.get(kind, 0),
                f"{kind} GPU(s)",
            )
            for kind, limit in sorted(quotas.gpus.items())
        ]
        for quota, limit, used, wanted, unit in limits:
            if limit is not None and wanted > limit and wanted > used:
                raise QuotaExceeded(
                    f"quota exceeded: org {org.slug} may have {limit} {unit}, this request "
                    f"would make {wanted} (quota {quota})",
                    quota=quota,
                    org=org.slug,
                )
