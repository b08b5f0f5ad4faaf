"""ClusterStore: what the API, the scheduler and the agent need from durable state.

Kept free of any backend's idioms: the embedded backend is SQLite, the fleet backend etcd.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from pydantic import BaseModel, Field

from hangar.model.gpu import GpuEvent, GpuRecord, GpuState
from hangar.model.machine import Lease, Machine, MachineEvent, MachineState


class App(BaseModel):
    name: str
    org_slug: str
    created_at: float


class RunStatus:
    RUNNING = "running"
    ROLLING_BACK = "rolling_back"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNFINISHED = (RUNNING, ROLLING_BACK)


class RunRecord(BaseModel):
    """One durable operation on one machine: a plan of named steps and how far it got."""

    id: str
    machine_id: str
    operation: str
    status: str
    steps_done: list[str] = Field(default_factory=list)
    rollback_done: list[str] = Field(default_factory=list)
    params: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    error: str = ""
    created_at: float
    updated_at: float


class ClusterStore(Protocol):
    # apps
    def create_app(self, name: str, org_slug: str, now: float) -> App: ...
    def get_app(self, name: str) -> App | None: ...
    def list_apps(self, org_slug: str | None) -> list[App]: ...
    def delete_app(self, name: str) -> None: ...

    # machines
    def insert_machine(self, machine: Machine) -> None: ...
    def get_machine(self, machine_id: str) -> Machine | None: ...
    def list_machines(self, app: str | None, include_destroyed: bool = False) -> list[Machine]: ...
    def save_machine(self, machine: Machine) -> None: ...
    def set_state(
        self, machine_id: str, state: MachineState, now: float, reason: str = ""
    ) -> Machine: ...
    def save_config_version(self, machine: Machine, now: float) -> None: ...
    def list_config_versions(self, machine_id: str) -> list[dict[str, Any]]: ...

    # events
    def add_event(self, machine_id: str, event: MachineEvent) -> None: ...
    def list_events(self, machine_id: str, limit: int | None = None) -> list[MachineEvent]: ...

    # leases
    def get_lease(self, machine_id: str) -> Lease | None: ...
    def put_lease(self, machine_id: str, lease: Lease) -> None: ...
    def delete_lease(self, machine_id: str) -> None: ...

    # durable runs
    def insert_run(self, run: RunRecord) -> bool: ...
    def save_run(self, run: RunRecord) -> None: ...
    def get_run(self, run_id: str) -> RunRecord | None: ...
    def list_runs(
        self, machine_id: str | None = None, unfinished_only: bool = False
    ) -> list[RunRecord]: ...

    # VMM handles (what the agent needs to re-adopt a VM after a restart)
    def put_vm_handle(self, machine_id: str, handle: dict[str, Any]) -> None: ...
    def get_vm_handle(self, machine_id: str) -> dict[str, Any] | None: ...
    def delete_vm_handle(self, machine_id: str) -> None: ...
    def list_vm_handles(self) -> dict[str, dict[str, Any]]: ...

    # GPUs: inventory, claims and the handoff between tenants
    def upsert_gpu_inventory(self, gpu: GpuRecord) -> GpuRecord: ...
    def list_gpus(
        self, host_id: str | None = None, machine_id: str | None = None
    ) -> list[GpuRecord]: ...
    def get_gpu(self, bdf: str) -> GpuRecord | None: ...
    def claim_gpus(
        self,
        host_id: str,
        machine_id: str,
        kind: str,
        count: int,
        choose: Callable[[list[GpuRecord], int], list[GpuRecord] | None],
        now: float,
    ) -> list[GpuRecord] | None: ...
    def update_gpu(self, gpu: GpuRecord, expected_state: GpuState | None = None) -> bool: ...
    def add_gpu_event(self, event: GpuEvent) -> None: ...
    def list_gpu_events(self, bdf: str | None = None) -> list[GpuEvent]: ...
