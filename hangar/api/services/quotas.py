"""Per-org quotas over the machines an org has (every machine not destroyed counts):
machines, memory, and GPUs by kind. A request that would pass one gets a 422 naming it."""

from __future__ import annotations

from pydantic import BaseModel, Field

from hangar.errors import QuotaExceeded
from hangar.model.config import MachineConfig
from hangar.model.machine import Machine
from hangar.store.protocol import MachineStore, TenancyStore


class OrgUsage(BaseModel):
    machines: int = 0
    memory_mb: int = 0
    gpus: dict[str, int] = Field(default_factory=dict)

    def add(self, config: MachineConfig, sign: int = 1) -> None:
        self.machines += sign
        self.memory_mb += sign * config.guest.memory_mb
        kind, count = config.guest.gpu_kind, config.guest.gpus or 0
        if kind is not None and count:
            self.gpus[kind] = self.gpus.get(kind, 0) + sign * count


class QuotaService:
    def __init__(self, cluster: MachineStore, tenancy: TenancyStore) -> None:
        self._cluster = cluster
        self._tenancy = tenancy

    def usage(self, org_slug: str) -> OrgUsage:
        usage = OrgUsage()
        for app in self._cluster.list_apps(org_slug):
            for machine in self._cluster.list_machines(app.name):
                usage.add(machine.config)
        return usage

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
        if replacing is not None:
            after.add(replacing.config, sign=-1)
        after.add(config)
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
