"""``CommandBackends``: machines that are local processes, for the proxy bench and tests.

``start`` runs the machine's command and marks it ``started`` at once (as a VM is started
before its app listens; the proxy then waits for the port or the checks); ``stop`` ends the
process (TERM, then KILL after ``STOP_GRACE_S``) and marks it ``stopped`` or ``suspended``.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import Iterable, Mapping, Sequence

from hangar.errors import Conflict
from hangar.proxy.backends import BackendMachine, StopMode
from hangar.proxy.static import MemoryBackends

STOP_GRACE_S = 5.0


class CommandBackends(MemoryBackends):
    def __init__(
        self,
        machines: Iterable[BackendMachine] = (),
        commands: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        super().__init__(machines)
        self.commands: dict[str, list[str]] = {k: list(v) for k, v in (commands or {}).items()}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.starts: list[str] = []
        self.stops: list[tuple[str, StopMode]] = []

    async def start(self, machine: BackendMachine) -> None:
        argv = self.commands.get(machine.id)
        if argv is None:
            raise Conflict(f"machine {machine.id} has no command to start it with")
        self.starts.append(machine.id)
        # Popen, not asyncio's subprocess: it returns as soon as the child runs (asyncio's
        # took 15-25 ms more here, all of it on the path of a woken request).
        self.processes[machine.id] = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.update(machine.id, state="started")

    async def stop(self, machine: BackendMachine, mode: StopMode) -> None:
        self.stops.append((machine.id, mode))
        process = self.processes.pop(machine.id, None)
        if process is not None:
            await end_process(process)
        state = "suspended" if mode == "suspend" else "stopped"
        self.update(machine.id, state=state, checks=())

    async def close(self) -> None:
        for machine_id in list(self.processes):
            await end_process(self.processes.pop(machine_id))


async def end_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        await asyncio.to_thread(process.wait, STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await asyncio.to_thread(process.wait)
