"""The seam between the agent and the guest stack (images + VMM driver).

The agent's steps speak only this protocol; the real implementation composes
``hangar.images`` and a ``hangar.vmm`` driver (see ``hangar.agent.guest``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from hangar.model.machine import ImageRef, Machine

VmHandleData = dict[str, Any]


class GuestExit(BaseModel):
    """How a guest ended: the code its init reported, or why none was reported."""

    exit_code: int | None = None
    guest_error: str = ""


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

    async def prepare_initrd(self, machine: Machine, image_ref: ImageRef, dest: Path) -> None: ...

    async def launch(self, machine: Machine, run_dir: Path, gpus: list[str]) -> VmHandleData:
        """Boot the machine with these GPUs (PCI addresses, bound to vfio-pci) passed through."""
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


class RunDirLayout:
    """File names inside a machine's run directory, shared by the agent and the platform."""

    ROOT_DISK = "root.qcow2"
    INITRD = "initrd.img"
    CONSOLE_LOG = "console.log"
    CONTROL_LOG = "ctl.jsonl"
    BOOT_FILES = (ROOT_DISK, INITRD)
