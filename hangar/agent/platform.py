"""The seam between the agent and the guest stack (images + VMM driver).

The agent's steps speak only this protocol; the real implementation composes
``hangar.images`` and a ``hangar.vmm`` driver (see ``hangar.agent.guest``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from hangar.images.run_config import GuestVolume
from hangar.model.machine import ImageRef, Machine
from hangar.vmm.container import ContainerDevice, ContainerMount
from hangar.vmm.driver import NicSpec, VolumeDiskSpec
from hangar.vmm.gpu_topology import GpuTopology
from hangar.vmm.guest_exec import ExecResult, GuestProcess

VmHandleData = dict[str, Any]


@dataclass(frozen=True)
class GuestNetwork:
    """A boot's network interface: the port's NIC and what the guest's init is told (a VM), or
    the files its root folder gets instead (a sandbox machine: guest path -> content)."""

    nic: NicSpec
    kernel_args: list[str]
    etc_files: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BootSecrets:
    """What a boot gets of its app's secrets: variables for the process's environment, and
    the content of each secret a ``files[].secret_name`` names. Never logged."""

    env: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, bytes] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"BootSecrets(env={sorted(self.env)}, files={sorted(self.files)})"


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


class SandboxGpu(BaseModel):
    """What a sandbox-tier machine's GPU part is handed (``hangar.agent.slices``): the device
    nodes and read-only files it may use, and the environment that points CUDA at its MIG
    instance or MPS share."""

    devices: list[ContainerDevice] = []
    mounts: list[ContainerMount] = []
    env: dict[str, str] = {}


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

    async def prepare_root_tree(self, image_ref: ImageRef, dest: Path) -> None:
        """A sandbox-tier machine's root folder for one boot, from the same cached image a
        VM's root disk comes from; atomic (dest appears whole or not)."""
        ...

    async def prepare_initrd(
        self,
        machine: Machine,
        image_ref: ImageRef,
        dest: Path,
        secrets: BootSecrets,
        volumes: Sequence[GuestVolume] = (),
    ) -> None:
        """Write the machine's initrd (its process, environment, secrets and files; with
        ``volumes``, the volume tools and what init mounts); atomic, readable by its owner
        alone."""
        ...

    async def launch(
        self,
        machine: Machine,
        run_dir: Path,
        gpus: GpuBoot | None,
        network: GuestNetwork | None = None,
        volumes: Sequence[VolumeDiskSpec] = (),
        gpu_part: SandboxGpu | None = None,
        volume_binds: Sequence[ContainerMount] = (),
    ) -> VmHandleData:
        """Boot the machine in its tier; with ``gpus``, those GPUs (bound to vfio-pci) passed
        through; with ``network``, its NIC on the host's private network; with ``volumes``,
        those volume images as its disks (their key files are gone once this returns); a
        sandbox-tier machine with ``gpu_part``, its MIG instance or MPS share, and with
        ``volume_binds``, its volumes (mounted on the host) bound into its container."""
        ...

    def qmp_socket(self, handle: VmHandleData) -> Path | None:
        """The VMM's monitor, where volume operations on a running machine go."""
        ...

    async def resume(
        self,
        machine: Machine,
        run_dir: Path,
        network: GuestNetwork | None,
        snapshot: Path,
        volumes: Sequence[VolumeDiskSpec] = (),
        volume_binds: Sequence[ContainerMount] = (),
    ) -> VmHandleData:
        """Restore the machine from its suspend ``snapshot`` (the boot files in ``run_dir``
        as it left them, ``volumes`` as the disks it had, or a sandbox's ``volume_binds``):
        the guest runs on where it was. The snapshot is consumed; one that cannot be
        restored raises ``SnapshotUnusable`` and is dropped."""
        ...

    async def suspend(self, handle: VmHandleData, snapshot: Path) -> None:
        """Save the guest into ``snapshot`` and end its VMM (``SuspendFailed`` says whether
        the guest runs on)."""
        ...

    async def exec(
        self, handle: VmHandleData, argv: Sequence[str], stdin: bytes, timeout_s: float
    ) -> ExecResult:
        """Run ``argv`` inside the guest (its exec channel), never on the host."""
        ...

    async def processes(self, handle: VmHandleData) -> list[GuestProcess]: ...

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
