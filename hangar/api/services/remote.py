"""Guest operations carried to another host: the seam between the Machines API's services and
a fleet's relay (``hangar.fleet.relay.HostRelays``).

``hangar server`` has none: its one host runs every guest, and the services ask its agent's
platform and files. An API replica runs no guest: for a machine (or a volume) on a host, the
services hand the operation to the relay, which has that host's agent run the same service
code and answers with what it answered (its errors included, status and field kept).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from hangar.api.schemas import ExecRequest, ExecResponse, ProcessStat
from hangar.api.volume_schemas import (
    CreateVolumeRequest,
    ExtendVolumeRequest,
    ExtendVolumeResponse,
    VolumeSnapshotView,
    VolumeView,
)
from hangar.model.machine import Machine
from hangar.model.volume import Volume


class RemoteGuests(Protocol):
    async def exec(self, machine: Machine, request: ExecRequest) -> ExecResponse:
        """``POST .../exec`` of ``machine``, run by its host's agent."""
        ...

    async def processes(
        self, machine: Machine, sort_by: str | None, order: str | None
    ) -> list[ProcessStat]:
        """``GET .../ps``."""
        ...

    async def signal(self, machine: Machine, signal: str, nonce: str | None) -> None:
        """``POST .../signal`` (``nonce``: the caller's lease nonce, checked there)."""
        ...

    async def console(self, machine: Machine, follow: bool) -> AsyncIterator[bytes]:
        """``GET .../logs``: the host's answer is checked before this returns (its error is
        raised here); then the console's chunks as the host sends them."""
        ...

    async def create_volume(self, app: str, request: CreateVolumeRequest) -> VolumeView:
        """``POST /v1/apps/{app}/volumes``: a host is chosen for the volume, and its agent
        creates it there."""
        ...

    async def delete_volume(self, volume: Volume) -> VolumeView:
        """``DELETE /v1/apps/{app}/volumes/{id}``, by the agent of the volume's host."""
        ...

    async def extend_volume(
        self, volume: Volume, request: ExtendVolumeRequest
    ) -> ExtendVolumeResponse:
        """``PUT .../volumes/{id}/extend``, by the agent of the volume's host."""
        ...

    async def snapshot_volume(self, volume: Volume) -> VolumeSnapshotView:
        """``POST .../volumes/{id}/snapshots``, by the agent of the volume's host."""
        ...
