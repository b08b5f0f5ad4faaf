"""``MemoryBackends``: a ``Backends`` over machines held in memory, and read from a JSON file.

It is what ``hangar proxy --backends FILE`` and ``hangar bench proxy`` run on, and the base of
backends that start and stop real processes. The file holds machines as the Machines API
returns them (``id``, ``state``, ``private_ip``, ``config.services``, ``config.checks``), each
with its ``app``. A static file cannot start or stop anything: autostart and autostop there
raise ``Conflict``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hangar.errors import Conflict, InvalidRequest
from hangar.model.services import CheckStatus, MachineChecks, MachineServices
from hangar.proxy.backends import BackendMachine, StopMode

MAX_BACKENDS_FILE = 16 * 1024 * 1024


class _FileConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")
    services: MachineServices = Field(default_factory=list)
    checks: MachineChecks = Field(default_factory=dict)


class _FileMachine(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    app: str
    state: str = "started"
    private_ip: str = ""
    cordoned: bool = False
    config: _FileConfig = Field(default_factory=_FileConfig)


def load_backends_file(path: Path) -> list[BackendMachine]:
    """Machines from a JSON file: a list of machine objects, or ``{"machines": [...]}``."""
    try:
        if path.stat().st_size > MAX_BACKENDS_FILE:
            raise InvalidRequest(f"{path} is larger than {MAX_BACKENDS_FILE} bytes", path=str(path))
        data: Any = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"cannot read backends file {path}: {exc}", path=str(path)) from exc
    if isinstance(data, dict):
        data = data.get("machines", [])
    try:
        items = [_FileMachine.model_validate(item) for item in data]
    except (ValidationError, TypeError) as exc:
        raise InvalidRequest(f"backends file {path}: {exc}", path=str(path)) from exc
    return [
        BackendMachine(
            id=item.id,
            app=item.app,
            state=item.state,
            private_ip=item.private_ip,
            services=tuple(item.config.services),
            cordoned=item.cordoned,
            machine_checks=dict(item.config.checks),
        )
        for item in items
    ]


class MemoryBackends:
    """Machines in memory; every change is a new snapshot for ``watch``."""

    def __init__(self, machines: Iterable[BackendMachine] = ()) -> None:
        self._machines: dict[str, BackendMachine] = {m.id: m for m in machines}
        self._version = 0
        self._changed: asyncio.Future[None] | None = None

    @property
    def machines(self) -> dict[str, BackendMachine]:
        return dict(self._machines)

    def get(self, machine_id: str) -> BackendMachine:
        return self._machines[machine_id]

    def put(self, *machines: BackendMachine) -> None:
        for machine in machines:
            self._machines[machine.id] = machine
        self._bump()

    def replace_all(self, machines: Sequence[BackendMachine]) -> None:
        checks = {m.id: m.checks for m in self._machines.values()}
        self._machines = {
            m.id: dataclasses.replace(m, checks=checks.get(m.id, m.checks)) for m in machines
        }
        self._bump()

    def update(self, machine_id: str, **changes: Any) -> BackendMachine:
        machine = dataclasses.replace(self._machines[machine_id], **changes)
        self._machines[machine_id] = machine
        self._bump()
        return machine

    def set_checks(self, machine: BackendMachine, results: tuple[CheckStatus, ...]) -> None:
        """A ``CheckSink``: the checks runner's results go into the next snapshot."""
        if machine.id in self._machines:
            self.update(machine.id, checks=results)

    def _bump(self) -> None:
        self._version += 1
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        self._changed = None

    async def watch(self) -> AsyncIterator[Sequence[BackendMachine]]:
        seen = -1
        while True:
            if seen != self._version:
                seen = self._version
                yield list(self._machines.values())
                continue
            if self._changed is None:
                self._changed = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._changed)

    async def start(self, machine: BackendMachine) -> None:
        raise Conflict(f"machine {machine.id} is in a static backends file; it cannot be started")

    async def stop(self, machine: BackendMachine, mode: StopMode) -> None:
        raise Conflict(f"machine {machine.id} is in a static backends file; it cannot be stopped")
