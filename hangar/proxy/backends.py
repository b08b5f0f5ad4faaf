"""The proxy's one seam to the rest of hangar: which machines exist and how to start or stop one.

The proxy never reads the store or calls the agent itself. Whoever embeds it (``hangar server``,
or ``hangar proxy`` over the API on a fleet host) gives it a ``Backends``: a stream of snapshots of
the machines that have services, and two actions for autostart and autostop. Check results
arrive inside the snapshots (``BackendMachine.checks``), however they were produced.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from hangar.model.services import CheckStatus, MachineService, TopLevelCheck, service_check_name

STARTED = "started"
# States a machine can be woken from by a request (Fly's autostart).
WAKEABLE_STATES = frozenset({"stopped", "suspended"})
StopMode = Literal["stop", "suspend"]


@dataclass(frozen=True)
class BackendMachine:
    """What the proxy needs to know of one machine."""

    id: str
    app: str
    state: str
    """Fly's machine state: ``started``, ``stopped``, ``suspended``, ``starting``..."""
    private_ip: str
    """Where the proxy and the checks reach it; empty while it has no address."""
    services: tuple[MachineService, ...]
    cordoned: bool = False
    checks: tuple[CheckStatus, ...] = ()
    """The latest result of each of its checks (``config.checks`` and ``services[].checks``)."""
    machine_checks: Mapping[str, TopLevelCheck] = field(default_factory=dict)
    """``config.checks``: run by the checks runner; those of kind ``readiness`` gate traffic."""

    def gating_checks(self, service_index: int) -> set[str]:
        """The checks that must pass before a service of this machine gets traffic: the
        service's own and the machine's ``readiness`` checks."""
        service = self.services[service_index]
        return {
            service_check_name(index, check, service.internal_port)
            for index, check in enumerate(service.checks)
        } | {name for name, check in self.machine_checks.items() if check.kind == "readiness"}

    def check_state(self, service_index: int) -> str:
        """``passing``, ``critical`` (some gating check failed) or ``unknown`` (not run yet)."""
        gating = self.gating_checks(service_index)
        if not gating:
            return "passing"
        results = {status.name: status.status for status in self.checks}
        if any(results.get(name) == "critical" for name in gating):
            return "critical"
        if all(results.get(name) in ("passing", "warning") for name in gating):
            return "passing"
        return "unknown"


class Backends(Protocol):
    """Implemented over the store and the agent (embedded) or the Machines API (fleet)."""

    def watch(self) -> AsyncIterator[Sequence[BackendMachine]]:
        """Every machine that has services, now and again after each change (full snapshots).

        A snapshot must follow, soon after, every state change, address change, cordon and
        new check result of those machines. Iteration ends only when the proxy stops reading.
        """
        ...

    async def start(self, machine: BackendMachine) -> None:
        """Start a stopped machine or resume a suspended one (autostart).

        Returns once the start is under way; the proxy then waits for a snapshot showing it
        ``started`` (and its checks passing). Raises a ``HangarError`` if it cannot start.
        """
        ...

    async def stop(self, machine: BackendMachine, mode: StopMode) -> None:
        """Stop, or suspend, an idle machine (autostop). ``suspend`` may fall back to stop."""
        ...
