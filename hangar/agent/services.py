"""Machines' services on this host: the proxy's ``Backends`` over the machine store and the
agent, and the health checks that feed it.

Snapshots are rebuilt when the agent says something changed (coalesced: a burst of changes
makes one snapshot); the checks runner follows the same snapshots and writes each machine's
results to its record, which is itself a change. Autostart and autostop are agent runs like
any other (``start``, ``stop``, ``suspend``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from hangar.agent.agent import Agent
from hangar.errors import PreconditionFailed
from hangar.model.machine import Machine, MachineState
from hangar.model.run import StartRequest, StopRequest, SuspendRequest
from hangar.model.services import CheckStatus
from hangar.proxy.backends import BackendMachine, StopMode
from hangar.proxy.checks import CheckRunner

WATCH_COALESCE_S = 0.05


def backend_of(machine: Machine) -> BackendMachine:
    return BackendMachine(
        id=machine.id,
        app=machine.app,
        state=str(machine.state),
        private_ip=machine.private_ip,
        services=tuple(machine.config.services),
        cordoned=machine.cordoned,
        checks=tuple(machine.checks),
        machine_checks=dict(machine.config.checks),
    )


class AgentBackends:
    """The embedded server's ``Backends``: this host's machines that have services or checks
    (``everywhere``: every host's, for a fleet host's proxy, which reaches the others over the
    private network; only this host's proxy stops its machines when idle)."""

    def __init__(self, agent: Agent, *, everywhere: bool = False) -> None:
        self._agent = agent
        self._everywhere = everywhere

    def _here(self, machine: Machine) -> bool:
        return machine.host_id == self._agent.host.placement.host.id

    def _backend(self, machine: Machine | None) -> BackendMachine | None:
        """The machine as the proxy sees it, if it is this host's (or ``everywhere``) and has
        services or checks."""
        if machine is None or machine.state is MachineState.DESTROYED:
            return None
        if not self._everywhere and not self._here(machine):
            return None
        if not (machine.config.services or machine.config.checks):
            return None
        return backend_of(machine)

    def snapshot(self) -> list[BackendMachine]:
        known = (self._backend(machine) for machine in self._agent.machines.list_machines(None))
        return [backend for backend in known if backend is not None]

    async def watch(self) -> AsyncIterator[Sequence[BackendMachine]]:
        """The backends now, then again after each change. A change that names its machine
        reads that machine alone; one that does not reads them all."""
        changed = asyncio.Event()
        pending: set[str | None] = set()

        def note(machine_id: str | None) -> None:
            pending.add(machine_id)
            changed.set()

        stop_listening = self._agent.on_change(note)
        try:
            known = {backend.id: backend for backend in self.snapshot()}
            last = list(known.values())
            yield last
            while True:
                await changed.wait()
                changed.clear()
                await asyncio.sleep(WATCH_COALESCE_S)
                names, everything = set(pending), None in pending
                pending.clear()
                if everything:
                    known = {backend.id: backend for backend in self.snapshot()}
                else:
                    for machine_id in names - {None}:
                        assert machine_id is not None
                        backend = self._backend(self._agent.machines.get_machine(machine_id))
                        if backend is None:
                            known.pop(machine_id, None)
                        else:
                            known[machine_id] = backend
                snapshot = list(known.values())
                if snapshot != last:
                    last = snapshot
                    yield snapshot
        finally:
            stop_listening()

    async def start(self, machine: BackendMachine) -> None:
        record = self._agent.machines.get_machine(machine.id)
        if record is None or not record.state.startable:
            raise PreconditionFailed(
                f"machine {machine.id} cannot be started from {machine.state}", field="state"
            )
        if not self._agent.has_unfinished_run(machine.id):
            self._agent.submit_operation(machine.id, StartRequest())

    async def stop(self, machine: BackendMachine, mode: StopMode) -> None:
        """Autostop: suspend where asked and possible (a GPU machine cannot be), else stop."""
        record = self._agent.machines.get_machine(machine.id)
        if record is None or not record.state.holds_resources or not self._here(record):
            return  # another host's proxy saw none of its traffic: its own decides
        if not self._agent.has_unfinished_run(machine.id):
            suspend = (
                mode == "suspend"
                and record.state is MachineState.STARTED
                and not record.config.guest.gpus
            )
            self._agent.submit_operation(machine.id, SuspendRequest() if suspend else StopRequest())


class HealthChecks:
    """Runs every check of this host's machines and keeps the results in their records."""

    def __init__(self, agent: Agent, backends: AgentBackends) -> None:
        self._agent = agent
        self._backends = backends
        self.runner = CheckRunner(self._record, agent.clock)
        self._task: asyncio.Task[None] | None = None

    def _record(self, machine: BackendMachine, results: tuple[CheckStatus, ...]) -> None:
        current = self._agent.machines.get_machine(machine.id)
        if current is None or tuple(current.checks) == results:
            return
        self._agent.machines.set_checks(machine.id, list(results))
        self._agent.notify(machine.id)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        async for snapshot in self._backends.watch():
            self.runner.update(snapshot)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.runner.close()
