"""This host's volumes as the agent works on them: the image library
(:class:`~hangar.volumes.VolumeHost`), the shared volume records, and one lock per volume.

A volume's image is touched by two kinds of run: its own operations (``vol:ID``: create,
extend, snapshot, delete) and the boots of the machine it is attached to (QEMU opens it at
launch). The lock keeps them apart on this host: an operation decides under it whether a
running QEMU has the image (then it goes through QMP) or nobody does (then ``qemu-img``),
and a launch holds it until its VMM is recorded, so that decision is never made half-way
through a launch.

A sandbox-tier machine's volumes are mounted by this host (:mod:`hangar.volumes.host_mount`)
before its container starts and unmounted once it has ended; the storage daemon that has a
mounted volume's image open answers the same monitor commands as a VM's QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hangar.agent.platform import GuestPlatform
from hangar.errors import Unprocessable
from hangar.images.run_config import GuestVolume
from hangar.model.machine import Machine
from hangar.model.volume import Volume
from hangar.store.protocol import RunStore, VolumeStore
from hangar.store.volume_claims import volume_not_found
from hangar.vmm.container import ContainerMount
from hangar.vmm.driver import VolumeDiskSpec
from hangar.volumes import VolumeHost, VolumeSpec, guest_volumes


@dataclass
class HostVolumes:
    host: VolumeHost
    store: VolumeStore
    host_id: str
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def lock(self, volume_id: str) -> asyncio.Lock:
        return self._locks.setdefault(volume_id, asyncio.Lock())

    @contextlib.asynccontextmanager
    async def locked(self, volume_ids: Iterable[str]) -> AsyncIterator[None]:
        """Hold the locks of ``volume_ids``, taken in one order (no deadlock)."""
        async with contextlib.AsyncExitStack() as stack:
            for volume_id in sorted(set(volume_ids)):
                await stack.enter_async_context(self.lock(volume_id))
            yield

    def record(self, volume_id: str) -> Volume:
        volume = self.store.get_volume(volume_id)
        if volume is None:
            raise volume_not_found(volume_id)
        return volume

    def spec(self, volume_id: str) -> VolumeSpec:
        """What the image library needs of the record."""
        volume = self.record(volume_id)
        if volume.fstype != "ext4":
            raise Unprocessable(f"volume {volume_id}: unknown filesystem {volume.fstype}")
        return VolumeSpec(
            id=volume.id, size_gb=volume.size_gb, encrypted=volume.encrypted, fstype="ext4"
        )

    def guest_mounts(self, machine: Machine) -> list[GuestVolume]:
        """The machine's ``config.mounts`` as its init mounts them."""
        return guest_volumes(
            [(self.spec(mount.volume), mount.path) for mount in machine.config.mounts]
        )

    @contextlib.asynccontextmanager
    async def boot_disks(self, machine: Machine) -> AsyncIterator[list[VolumeDiskSpec]]:
        """The machine's volumes as disks of its next launch, their locks held for as long
        as this lasts. Each encrypted volume's key file is removed on the way out, whatever
        the launch did (the driver removes it first when QEMU has read it)."""
        volume_ids = [mount.volume for mount in machine.config.mounts]
        async with self.locked(volume_ids):
            disks: list[VolumeDiskSpec] = []
            try:
                for volume_id in volume_ids:
                    disk = await asyncio.to_thread(self.host.attachment, volume_id, machine.id)
                    disks.append(disk)
                yield disks
            finally:
                for disk in disks:
                    if disk.key_file is not None:
                        disk.key_file.unlink(missing_ok=True)

    async def mount_on_host(self, machine: Machine) -> None:
        """Mount the machine's volumes on this host for its container, under their locks;
        each encrypted volume's key file is removed once the daemon has read it."""
        volume_ids = [mount.volume for mount in machine.config.mounts]
        async with self.locked(volume_ids):
            for volume_id in volume_ids:
                if self.host.mounts.mounted(volume_id, machine.id):
                    continue
                disk = await asyncio.to_thread(self.host.attachment, volume_id, machine.id)
                try:
                    await asyncio.to_thread(self.host.mounts.mount, disk, machine.id)
                finally:
                    if disk.key_file is not None:
                        disk.key_file.unlink(missing_ok=True)

    def mounted_for(self, machine: Machine) -> bool:
        return all(
            self.host.mounts.mounted(mount.volume, machine.id) for mount in machine.config.mounts
        )

    def container_mounts(self, machine: Machine) -> list[ContainerMount]:
        """The machine's volumes, mounted on this host, as its container's binds."""
        self.guest_mounts(machine)  # the same checks as a VM's mounts
        return [
            ContainerMount(
                source=self.host.mounts.paths(mount.volume).fs,
                destination=mount.path,
                read_only=False,
            )
            for mount in machine.config.mounts
        ]

    async def unmount_from_host(self, machine_id: str) -> None:
        """Unmount every volume this host mounted for ``machine_id`` (its container has
        ended), under their locks."""
        volume_ids = self.host.mounts.owned_by(machine_id)
        async with self.locked(volume_ids):
            for volume_id in volume_ids:
                await asyncio.to_thread(self.host.mounts.unmount, volume_id)


def running_qmp(
    volumes: HostVolumes, runs: RunStore, platform: GuestPlatform, volume_id: str
) -> Path | None:
    """The monitor of the running QEMU (or storage daemon, for a sandbox machine) that has
    the volume open, if one has (call it under the volume's lock)."""
    daemon = volumes.host.mounts.qmp_socket(volume_id)
    if daemon is not None:
        return daemon
    volume = volumes.store.get_volume(volume_id)
    if volume is None or volume.attached_machine_id is None:
        return None
    handle = runs.get_vm_handle(volume.attached_machine_id)
    if handle is None or not platform.running(handle):
        return None
    return platform.qmp_socket(handle)
