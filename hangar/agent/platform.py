"""The seam between the agent and the guest stack (images + VMM driver).

The agent's steps speak only this protocol; the real implementation composes
``hangar.images`` and a ``hangar.vmm`` driver (see ``hangar.agent.guest``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from hangar.images.run_config import GuestVolume
from hangar.model.machine import ImageRef, Machine
from hangar.vmm.driver import NicSpec, VolumeDiskSpec
from hangar.vmm.gpu_topology import GpuTopology

VmHandleData = dict[str, Any]


@dataclass(frozen=True)
class GuestNetwork:
    """A boot's network interface: the tap's NIC and what the guest's init is told."""

    nic: NicSpec
    kernel_args: list[str]


class GuestExit(BaseModel):
    """How a guest ended: the code its init reported, or why none was reported."""

    exit_code: int | None = None
    guest_error: str = ""


class GpuBoot(BaseModel):
    """What a GPU machine boots with: its GPUs' layout and memory (each GPU behind a root
    port on its NUMA node's expander, huge pages there), and the kernel arguments its GPUs
    need (NVLink off for a lone NVSwitch GPU)."""

    topology: GpuTopology
    kernel_args: list[str] = []


class GuestPlatform(Protocol):
    async def resolve_image(self, image: str, owner: str = "") -> ImageRef:
        """Pull (or find cached) the image; the returned ref carries its manifest digest.
        ``owner`` (the machine's org) is whose share of the image workers the pull takes."""
        ...

    def image_cached(self, image_ref: ImageRef) -> bool: ...

    async def prepare_root_disk(self, image_ref: ImageRef, dest: Path) -> None:
        """Write a fresh writable root disk for one boot (a qcow2 overlay over the cached
        image); atomic (dest appears whole or not)."""
        ...

    async def prepare_initrd(
        self,
        machine: Machine,
        image_ref: ImageRef,
        dest: Path,
        volumes: Sequence[GuestVolume] = (),
    ) -> None:
        """The machine's initrd; with ``volumes``, the volume tools and what init mounts."""
        ...

    async def launch(
        self,
        machine: Machine,
        run_dir: Path,
        gpus: GpuBoot | None,
        network: GuestNetwork | None = None,
        volumes: Sequence[VolumeDiskSpec] = (),
    ) -> VmHandleData:
        """Boot the machine; with ``gpus``, those GPUs (bound to vfio-pci) passed through;
        with ``network``, its NIC on the host's private network; with ``volumes``, those
        volume images as its disks (their key files are gone once this returns)."""
        ...

    def qmp_socket(self, handle: VmHandleData) -> Path | None:
        """The VMM's monitor, where volume operations on a running machine go."""
        ...

    async def gpu_addresses(
        self, handle: VmHandleData, device_ids: Mapping[str, str]
    ) -> dict[str, str]:
        """Where the guest sees each passed-through function, once its firmware has placed
        them: guest PCI address -> host BDF, for the VMM ``device_ids`` -> host BDF. What it
        could not place within its deadline is left out."""
        ...

    async def alive(self, handle: VmHandleData) -> bool:
        """Is the VMM behind this handle still ours, running and answering its monitor?"""
        ...

    def running(self, handle: VmHandleData) -> bool:
        """Is the VMM's process still alive? Cheap, for the agent's periodic watch."""
        ...

    async def stop(self, handle: VmHandleData, timeout_s: float, signum: int) -> None: ...

    async def signal(self, handle: VmHandleData, signum: int) -> None: ...

    async def kill(self, handle: VmHandleData) -> None: ...

    async def guest_exit(self, handle: VmHandleData) -> GuestExit:
        """How the guest behind ``handle`` ended: the code it reported, or the VMM's own
        account of why it reported none (QEMU gone first, a failed VM state)."""
        ...

    def vmm_processes(self, machines_dir: Path) -> dict[int, str]:
        """Live VMM processes started for machines under ``machines_dir``: pid -> machine id."""
        ...

    def kill_process(self, pid: int) -> None: ...
