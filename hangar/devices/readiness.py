"""Host-wide conditions for passing GPUs to VMs: the vfio-pci driver and the hypervisor."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from typing import Protocol

from pydantic import BaseModel, ConfigDict

from hangar.devices.pci import PCI_DRIVERS
from hangar.devices.sysfs import SysfsRoot

VFIO_PCI = "vfio-pci"
QEMU_BINARY = "qemu-system-x86_64"

_COMMAND_TIMEOUT_S = 20.0


class CommandResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    returncode: int
    stdout: str = ""
    stderr: str = ""


class CommandRunner(Protocol):
    def run(self, argv: Sequence[str]) -> CommandResult: ...


class SubprocessRunner:
    """Runs a command and returns its output; a missing binary reads as exit status 127."""

    def run(self, argv: Sequence[str]) -> CommandResult:
        try:
            done = subprocess.run(
                list(argv),
                capture_output=True,
                text=True,
                timeout=_COMMAND_TIMEOUT_S,
                check=False,
            )
        except FileNotFoundError as error:
            return CommandResult(returncode=127, stderr=str(error))
        except subprocess.TimeoutExpired:
            return CommandResult(returncode=124, stderr=f"timed out after {_COMMAND_TIMEOUT_S}s")
        return CommandResult(returncode=done.returncode, stdout=done.stdout, stderr=done.stderr)


class VfioStatus(BaseModel):
    model_config = ConfigDict(frozen=True)

    available: bool
    loaded: bool
    detail: str


class HypervisorStatus(BaseModel):
    model_config = ConfigDict(frozen=True)

    binary: str
    available: bool
    version: str | None = None
    detail: str


def probe_vfio(sysfs: SysfsRoot, runner: CommandRunner) -> VfioStatus:
    """Loaded when sysfs lists the driver; otherwise available if ``modinfo`` finds the module."""
    if sysfs.exists(f"{PCI_DRIVERS}/{VFIO_PCI}"):
        return VfioStatus(available=True, loaded=True, detail="vfio-pci driver loaded")
    found = runner.run(["modinfo", "-n", VFIO_PCI])
    if found.returncode == 0:
        return VfioStatus(
            available=True,
            loaded=False,
            detail=f"vfio-pci module at {found.stdout.strip()}, not loaded (modprobe vfio-pci)",
        )
    return VfioStatus(
        available=False,
        loaded=False,
        detail="vfio-pci is neither loaded nor installed for this kernel",
    )


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
