"""Where a new machine goes when the API serves more than one host: the seam between the
Machines API and a fleet's scheduler (``hangar.fleet.placer.FleetPlacer``). ``hangar server``
has none: its one host takes every machine and its agent claims at start."""

from __future__ import annotations

from typing import Protocol

from hangar.model.config import MachineConfig


class MachinePlacer(Protocol):
    def place(
        self,
        machine_id: str,
        region: str | None,
        config: MachineConfig,
        launching: bool,
        host_id: str | None = None,
    ) -> tuple[str, str]:
        """Choose the machine's host (and claim what it needs there when ``launching``);
        returns (host id, region). ``host_id``: the machine must run there (its volumes
        are). ``InsufficientCapacity`` when no reachable host fits."""
        ...

    def release(self, host_id: str, machine_id: str) -> None:
        """Give back a claim taken by ``place`` for a machine that was not recorded."""
        ...

    def host_status(self, host_id: str) -> str:
        """Fly's ``host_status``: ``ok`` while the host's agent holds its lease."""
        ...
