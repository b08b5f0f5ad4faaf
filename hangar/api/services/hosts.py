"""Hosts and their GPUs: inventory, claim states, quarantine release, GPU request checks."""

from __future__ import annotations

from pydantic import BaseModel

from hangar.agent.agent import Agent
from hangar.devices import HostInventory
from hangar.errors import NotFound
from hangar.model.gpu import GpuEvent, GpuRecord, GpuState
from hangar.model.host import HostInfo


class HostView(BaseModel):
    id: str
    region: str
    pool: str
    cpus: int
    memory_mb: int
    gpus: dict[str, int]
    """GPU kind -> how many are on the host (any state)."""


class GpuView(GpuRecord):
    """A GPU as the operator sees it: the agent's record, with its claim state and holder."""

    state: GpuState
    machine_id: str = ""


class HostGpusView(BaseModel):
    host_id: str
    inventory: HostInventory | None
    gpus: list[GpuView]


class HostService:
    def __init__(self, agent: Agent, host: HostInfo) -> None:
        self._agent = agent
        self._host = host
        self._gpus = agent.host.gpu_store
        self._placement = agent.host.placement

    def _view(
        self, record: GpuRecord, states: dict[str, GpuState], holders: dict[str, str]
    ) -> GpuView:
        return GpuView(
            **record.model_dump(),
            state=states.get(record.bdf, GpuState.QUARANTINED),
            machine_id=holders.get(record.bdf, ""),
        )

    def gpu_views(self) -> list[GpuView]:
        states = {gpu.bdf: gpu.state for gpu in self._placement.gpus()}
        holders = self._placement.holders()
        return [
            self._view(record, states, holders)
            for record in self._gpus.list_gpus(host_id=self._host.id)
        ]

    def _require(self, host_id: str) -> None:
        if host_id != self._host.id:
            raise NotFound(f"host {host_id} not found", field="host_id")

    def list_hosts(self) -> list[HostView]:
        counts: dict[str, int] = {}
        for gpu in self._gpus.list_gpus(host_id=self._host.id):
            counts[gpu.kind] = counts.get(gpu.kind, 0) + 1
        pool = "gpu" if counts else "general"
        return [
            HostView(
                id=self._host.id,
                region=self._host.region,
                pool=pool,
                cpus=self._host.cpus,
                memory_mb=self._host.memory_mb,
                gpus=counts,
            )
        ]

    def gpus(self, host_id: str) -> HostGpusView:
        self._require(host_id)
        devices = self._agent.host.gpus
        inventory = devices.inventory() if devices is not None else None
        return HostGpusView(host_id=host_id, inventory=inventory, gpus=self.gpu_views())

    async def gpu_events(self, host_id: str, bdf: str) -> list[GpuEvent]:
        self._require(host_id)
        if self._gpus.get_gpu(bdf) is None:
            raise NotFound(f"GPU {bdf} not found on host {host_id}", field="bdf")
        return self._gpus.list_gpu_events(bdf)

    async def release_quarantine(self, host_id: str, bdf: str, actor: str, reason: str) -> GpuView:
        self._require(host_id)
        self._agent.release_quarantine(bdf, actor=actor, reason=reason)
        return next(view for view in self.gpu_views() if view.bdf == bdf)
