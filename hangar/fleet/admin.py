"""Operator actions on a fleet's hosts: cordon (no new placements there), uncordon, and drain
(cordon, then recreate the host's stopped machines that have no volumes on other hosts).

A drained machine is recreated with the same config and name under a new id: the old record is
renamed first (``NAME`` is then free), the new one created through the Machines API's own path
(placed by the scheduler, so never on a cordoned host), an event on each names the other, and
the old one is destroyed by its host's agent. A machine that runs, has volumes, or is leased
stays, and the report says why. If the new machine cannot be created, the old one gets its
name back: nothing is half moved.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from hangar.api.deps import AccessDep
from hangar.api.schemas import CreateMachineRequest
from hangar.api.scopes import Scope, requires
from hangar.api.services.machines import MachineService
from hangar.clock import Clock
from hangar.errors import HangarError, NotFound
from hangar.fleet.cordons import Cordon, Cordons
from hangar.model.machine import Machine, MachineState, host_event
from hangar.scheduler import ClaimStore
from hangar.store.protocol import MachineStore

MOVABLE = frozenset(
    {MachineState.CREATED, MachineState.STOPPED, MachineState.FAILED, MachineState.LAUNCH_FAILED}
)


class MovedMachine(BaseModel):
    machine_id: str
    """The old id (destroyed on the drained host)."""
    new_machine_id: str
    host_id: str
    """Where the new one was placed."""


class LeftMachine(BaseModel):
    machine_id: str
    reason: str


class DrainReport(BaseModel):
    host_id: str
    cordon: Cordon
    moved: list[MovedMachine] = Field(default_factory=list)
    left: list[LeftMachine] = Field(default_factory=list)


class FleetHosts:
    def __init__(
        self,
        cordons: Cordons,
        store: MachineStore,
        machines: MachineService,
        claims: ClaimStore,
        clock: Clock,
    ) -> None:
        self._cordons = cordons
        self._store = store
        self._machines = machines
        self._claims = claims
        self._clock = clock

    def _require(self, host_id: str) -> None:
        if self._claims.read_host(host_id) is None:
            raise NotFound(f"host {host_id} not found", field="host_id")

    def cordon(self, host_id: str, actor: str, draining: bool = False) -> Cordon:
        self._require(host_id)
        return self._cordons.cordon(
            Cordon(host_id=host_id, by=actor, at=self._clock.now(), draining=draining)
        )

    def uncordon(self, host_id: str) -> bool:
        self._require(host_id)
        return self._cordons.uncordon(host_id)

    def drain(self, host_id: str, actor: str) -> DrainReport:
        report = DrainReport(host_id=host_id, cordon=self.cordon(host_id, actor, draining=True))
        for machine in self._store.list_machines(None):
            if machine.host_id != host_id:
                continue
            reason = self._why_not_movable(machine)
            if reason:
                report.left.append(LeftMachine(machine_id=machine.id, reason=reason))
                continue
            try:
                report.moved.append(self._move(machine, actor))
            except HangarError as error:
                report.left.append(LeftMachine(machine_id=machine.id, reason=str(error)))
        return report

    def _why_not_movable(self, machine: Machine) -> str:
        if machine.state not in MOVABLE:
            return f"{machine.state}: only machines that are not running are recreated"
        if machine.config.mounts:
            return "it has volumes on this host"
        lease = self._store.get_lease(machine.id)
        if lease is not None and lease.expires_at > self._clock.now():
            return f"it is leased by {lease.owner}"
        return ""

    def _move(self, machine: Machine, actor: str) -> MovedMachine:
        name = machine.name
        self._store.save_machine(machine.model_copy(update={"name": f"drained-{machine.id}"}))
        try:
            created = self._machines.create(
                machine.app,
                CreateMachineRequest(
                    name=name, region=machine.region, config=machine.config, skip_launch=True
                ),
                actor,
            )
        except BaseException:
            current = self._store.get_machine(machine.id)
            if current is not None:
                self._store.save_machine(current.model_copy(update={"name": name}))
            raise
        placed = self._store.get_machine(created.id)
        new_host = placed.host_id if placed is not None else ""
        now = self._clock.now()
        self._store.add_event(
            machine.id,
            host_event(
                "drain", "replaced", now, request={"machine_id": created.id, "host_id": new_host}
            ),
        )
        self._store.add_event(
            created.id,
            host_event(
                "drain",
                "recreated",
                now,
                request={"machine_id": machine.id, "host_id": machine.host_id},
            ),
        )
        self._machines.destroy(machine.app, machine.id, force=False, nonce=None)
        return MovedMachine(machine_id=machine.id, new_machine_id=created.id, host_id=new_host)


router = APIRouter(prefix="/v1/hosts", tags=["hosts"])


def _hosts(request: Request) -> FleetHosts:
    hosts: FleetHosts = request.app.state.fleet_hosts
    return hosts


@router.post("/{host_id}/cordon")
@requires(Scope.OPERATOR)
async def cordon_host(request: Request, access: AccessDep, host_id: str) -> Cordon:
    access.note(host=host_id)
    return _hosts(request).cordon(host_id, access.actor)


@router.post("/{host_id}/uncordon")
@requires(Scope.OPERATOR)
async def uncordon_host(request: Request, access: AccessDep, host_id: str) -> dict[str, bool]:
    access.note(host=host_id)
    return {"ok": _hosts(request).uncordon(host_id)}


@router.post("/{host_id}/drain")
@requires(Scope.OPERATOR)
async def drain_host(request: Request, access: AccessDep, host_id: str) -> DrainReport:
    access.note(host=host_id)
    return _hosts(request).drain(host_id, access.actor)
