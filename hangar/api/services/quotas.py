"""Per-org quotas over the machines an org has (every machine not destroyed counts):
machines, memory, and GPUs by kind; and over its volumes (every volume that holds or will
hold an image counts): how many, and their GB together. A request that would pass one gets
a 422 naming it.

A machine with updates still pending (queued or running in the agent) counts with the
largest of its configs, current and pending, for each resource: an update waiting behind a
stop must not leave room that it will take back when it lands.
"""

from __future__ import annotations

from collections.abc import Sequence

from hangar.errors import QuotaExceeded
from hangar.model.config import GuestConfig, MachineConfig
from hangar.model.footprint import Footprint
from hangar.model.machine import Machine, MachineState
from hangar.model.run import UpdateRequest
from hangar.model.volume import Volume
from hangar.store.protocol import MachineStore, Org, OrgQuotas, RunStore, TenancyStore, VolumeStore

Limit = tuple[str, int | None, int, int, str]
"""quota name, its limit, the org's use now, its use if the request went through, unit"""


class OrgUsage(Footprint):
    volumes: int = 0
    volume_gb: int = 0

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

    def add_volume(self, size_gb: int, sign: int = 1) -> None:
        self.volumes += sign
        self.volume_gb += sign * size_gb


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
        self,
        cluster: MachineStore,
        tenancy: TenancyStore,
        runs: RunStore | None = None,
        volumes: VolumeStore | None = None,
    ) -> None:
        self._cluster = cluster
        self._tenancy = tenancy
        self._volumes = volumes
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

    def machine_usage(self, org_slug: str) -> OrgUsage:
        """The org's machines: the store's counters (no machine is read), with each machine
        that has updates pending counted at the largest of its configs (those machines are
        read, the queued updates being few whatever the fleet)."""
        usage = OrgUsage(**self._cluster.machine_usage(org_slug).model_dump())
        for machine_id, configs in self._pending_configs().items():
            machine = self._cluster.get_machine(machine_id)
            if machine is None or machine.state is MachineState.DESTROYED:
                continue
            app = self._cluster.get_app(machine.app)
            if app is None or app.org_slug != org_slug or machine.app_id not in ("", app.id):
                continue
            usage.add(machine.config, sign=-1)
            usage.add_largest([machine.config, *configs])
        return usage

    def usage(self, org_slug: str) -> OrgUsage:
        """The org's machines (counted) and its volumes (read)."""
        usage = self.machine_usage(org_slug)
        for app in self._cluster.list_apps(org_slug) if self._volumes else []:
            for volume in self._volumes.list_volumes(app.name) if self._volumes else []:
                if volume.state.holds_space:
                    usage.add_volume(volume.size_gb)
        return usage

    def room(self, org_slug: str, guest: GuestConfig) -> int | None:
        org = self._tenancy.get_org(org_slug)
        if org is None:
            return 0
        return room_for(org.quotas, self.machine_usage(org_slug), guest)

    def _org_of(self, app_name: str) -> Org | None:
        app = self._cluster.get_app(app_name)
        return self._tenancy.get_org(app.org_slug) if app is not None else None

    def check_volume(self, app_name: str, size_gb: int, replacing: Volume | None = None) -> None:
        """Raise QuotaExceeded if the app's org cannot take a volume of ``size_gb`` (or
        ``replacing`` grown to it, for an extend). The caller records the volume without
        yielding in between, as :meth:`check` says."""
        org = self._org_of(app_name)
        if org is None:
            return
        before = self.usage(org.slug)
        after = before.model_copy(deep=True)
        if replacing is not None and replacing.state.holds_space:
            after.add_volume(replacing.size_gb, sign=-1)
        after.add_volume(size_gb)
        quotas = org.quotas
        _enforce(
            org,
            [
                ("volumes", quotas.volumes, before.volumes, after.volumes, "volume(s)"),
                ("volume_gb", quotas.volume_gb, before.volume_gb, after.volume_gb, "GB of volumes"),
            ],
        )

    def check(self, app_name: str, config: MachineConfig, replacing: Machine | None = None) -> None:
        """Raise QuotaExceeded if the app's org cannot take a machine with ``config`` (in place
        of ``replacing``, for an update). Only what the request grows is checked, so an org over
        a lowered quota can still shrink or keep its machines. The caller creates nothing until
        this returns, and does so without yielding to the event loop in between, so concurrent
        requests cannot both pass on the same room."""
        org = self._org_of(app_name)
        if org is None:
            return
        before = self.machine_usage(org.slug)
        after = before.model_copy(deep=True)
        if replacing is None:
            after.add(config)
        else:
            configs = self._configs_of(replacing, self._pending_configs())
            after.add_largest(configs, sign=-1)
            after.add_largest([*configs, config])
        quotas = org.quotas
        limits: list[Limit] = [
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
        _enforce(org, limits)


def _enforce(org: Org, limits: list[Limit]) -> None:
    """Only what the request grows is checked, so an org over a lowered quota can still
    shrink or keep what it has."""
    for quota, limit, used, wanted, unit in limits:
        if limit is not None and wanted > limit and wanted > used:
            raise QuotaExceeded(
                f"quota exceeded: org {org.slug} may have {limit} {unit}, this request "
                f"would make {wanted} (quota {quota})",
                quota=quota,
                org=org.slug,
            )
