"""Host-wide conditions for passing GPUs to VMs: VFIO ready to use, and the hypervisor.

vfio-pci being installed is not enough. VFIO is ready when the vfio-pci driver is loaded,
``/dev/vfio/vfio`` exists, and interrupt remapping is on: without it ``vfio_iommu_type1``
refuses to attach a group (unless ``allow_unsafe_interrupts`` is set, which lets a guest
forge interrupts through DMA, so hangar counts that as not ready either).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from typing import Protocol

from pydantic import BaseModel, ConfigDict

from hangar.devices.hostpaths import HostPaths
from hangar.devices.pci import PCI_DRIVERS
from hangar.devices.sysfs import SysfsRoot
from hangar.errors import DeviceError

VFIO_PCI = "vfio-pci"
QEMU_BINARY = "qemu-system-x86_64"

_COMMAND_TIMEOUT_S = 20.0
VFIO_CONTAINER_NODE = "vfio/vfio"
UNSAFE_INTERRUPTS = "module/vfio_iommu_type1/parameters/allow_unsafe_interrupts"
# Interrupt chips of the remapping domain, as /proc/interrupts names them (IR-PCI-MSI...).
_REMAPPED_CHIP = re.compile(r"\bIR-[A-Z]")


class CommandResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    returncode: int
    stdout: str = ""
    stderr: str = ""


class CommandRunner(Protocol):
    def run(self, argv: Sequence[str]) -> CommandResult: ...


class SubprocessRunner:
    """Runs a command and returns its output; a missing binary reads as exit status 127,
    one that outlives ``timeout_s`` is killed and reads as 124."""

    def __init__(self, timeout_s: float = _COMMAND_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s

    def run(self, argv: Sequence[str]) -> CommandResult:
        try:
            done = subprocess.run(
                list(argv),
                capture_output=True,
                text=True,
                timeout=self.timeout_s,
                check=False,
            )
        except FileNotFoundError as error:
            return CommandResult(returncode=127, stderr=str(error))
        except subprocess.TimeoutExpired:
            return CommandResult(returncode=124, stderr=f"timed out after {self.timeout_s}s")
        return CommandResult(returncode=done.returncode, stdout=done.stdout, stderr=done.stderr)


class VendorTool:
    """A vendor command (gpu-admin-tools, Fabric Manager's ``fmpm``) run with a deadline
    (killed past it); a failure, the timeout included, is a DeviceError with ``reason``."""

    def __init__(
        self, tool: Sequence[str], runner: CommandRunner | None = None, timeout_s: float = 120.0
    ) -> None:
        self.tool = list(tool)
        self.runner = runner or SubprocessRunner(timeout_s=timeout_s)

    def run(self, *args: str, reason: str) -> CommandResult:
        argv = [*self.tool, *args]
        done = self.runner.run(argv)
        if done.returncode != 0:
            raise DeviceError(
                f"{' '.join(argv)} failed (exit {done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-500:]}",
                reason=reason,
                timed_out=done.returncode == 124,
            )
        return done


class VfioStatus(BaseModel):
    model_config = ConfigDict(frozen=True)

    available: bool
    """Ready to pass devices through: every check below holds."""
    loaded: bool
    detail: str
    installed: bool = False
    container_node: bool = False
    """``/dev/vfio/vfio`` exists."""
    interrupt_remapping: bool | None = None
    """None when ``/proc/interrupts`` could not be read."""
    unsafe_interrupts: bool = False
    problems: list[str] = []


class HypervisorStatus(BaseModel):
    model_config = ConfigDict(frozen=True)

    binary: str
    available: bool
    version: str | None = None
    detail: str


def probe_vfio(
    sysfs: SysfsRoot, runner: CommandRunner, paths: HostPaths | None = None
) -> VfioStatus:
    """Is VFIO ready on the host whose sysfs is ``sysfs`` (``paths`` locates its ``/dev``
    and ``/proc``; by default beside the sysfs root)? Reads only."""
    paths = paths or HostPaths.beside(sysfs)
    problems: list[str] = []
    loaded = sysfs.exists(f"{PCI_DRIVERS}/{VFIO_PCI}")
    installed = loaded
    if not loaded:
        found = runner.run(["modinfo", "-n", VFIO_PCI])
        installed = found.returncode == 0
        problems.append(
            f"vfio-pci module at {found.stdout.strip()}, not loaded (modprobe vfio-pci)"
            if installed
            else "vfio-pci is neither loaded nor installed for this kernel"
        )
    container = paths.dev is not None and (paths.dev / VFIO_CONTAINER_NODE).exists()
    if paths.dev is None:
        problems.append(f"no /dev known for sysfs root {sysfs.root}: /dev/vfio not checked")
    elif not container:
        problems.append(f"{paths.dev / VFIO_CONTAINER_NODE} does not exist")
    remapping = interrupt_remapping(paths)
    if remapping is None:
        problems.append("interrupt remapping unknown: /proc/interrupts not readable")
    elif not remapping:
        problems.append(
            "interrupt remapping is off (no IR- interrupt chips): vfio_iommu_type1 refuses "
            "to attach groups (enable it in firmware, intel_iommu=on / amd_iommu=on)"
        )
    unsafe = sysfs.read_text(UNSAFE_INTERRUPTS) == "Y"
    if unsafe:
        problems.append(
            "vfio_iommu_type1 allow_unsafe_interrupts=Y lets a guest forge interrupts: turn it off"
        )
    ready = not problems
    return VfioStatus(
        available=ready,
        loaded=loaded,
        installed=installed,
        container_node=container,
        interrupt_remapping=remapping,
        unsafe_interrupts=unsafe,
        problems=problems,
        detail="vfio-pci loaded, /dev/vfio/vfio present, interrupt remapping on"
        if ready
        else "; ".join(problems),
    )


def interrupt_remapping(paths: HostPaths) -> bool | None:
    """Whether interrupts go through the IOMMU's remapping table (``IR-`` chips in
    ``/proc/interrupts``, as both Intel DMAR and AMD-Vi name them); None if unreadable."""
    if paths.proc is None:
        return None
    try:
        text = (paths.proc / "interrupts").read_text(errors="replace")
    except OSError:
        return None
    return _REMAPPED_CHIP.search(text) is not None


def probe_hypervisor(runner: CommandRunner, binary: str = QEMU_BINARY) -> HypervisorStatus:
    """QEMU runs GPU machines (NVIDIA's supported VFIO path): is it installed here?"""
    answer = runner.run([binary, "--version"])
    if answer.returncode != 0:
        return HypervisorStatus(
            binary=binary,
            available=False,
            detail=f"{binary} not runnable (exit {answer.returncode}): GPU machines need QEMU",
        )
    lines = answer.stdout.strip().splitlines()
    version = lines[0] if lines else None
    return HypervisorStatus(
        binary=binary, available=True, version=version, detail=version or binary
    )
