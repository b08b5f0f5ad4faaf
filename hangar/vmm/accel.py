"""Choosing how a host runs guests: KVM where it works for a stock kernel, TCG otherwise.

The choice also fixes the machine type and CPU model: microvm boots fastest, but under
TCG it hangs before the kernel prints anything in about one boot in six, so TCG uses q35.
A kvm-pvm host (``/sys/module/kvm_pvm``) serves ``/dev/kvm`` only to guests built with
``CONFIG_PVM_GUEST``; a stock guest kernel hangs there, so such a host gets TCG unless
``HANGAR_PVM_GUEST_KERNEL=1`` says the guest kernel is a PVM one.

GPU machines are different: always q35 (pxb-pcie expanders and root ports; microvm has
neither), always KVM (VFIO under TCG is not a thing), and the CPU's physical address bits
passed through with a limit the host's second-level page tables can map
(:func:`host_phys_bits_limit`).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from hangar.errors import VmmError
from hangar.settings import env_name

log = logging.getLogger(__name__)

FORCE_ENV = env_name("accel")
PVM_GUEST_KERNEL_ENV = env_name("pvm_guest_kernel")
Accel = Literal["kvm", "tcg"]

KVM_MACHINE_TYPE = "microvm,isa-serial=on,pcie=on"
TCG_MACHINE_TYPE = "q35"
KVM_CPU_MODEL = "host"
TCG_CPU_MODEL = "max"
GPU_MACHINE_TYPE = "q35"
FOUR_LEVEL_PAGING_BITS = 48
"""What 4-level EPT/NPT tables map: guest-physical addresses below 256 TiB."""

_ADDRESS_SIZES = re.compile(r"^address sizes\s*:\s*(\d+) bits physical", re.MULTILINE)
_FLAGS = re.compile(r"^flags\s*:(.*)$", re.MULTILINE)
_VMX_FLAGS = re.compile(r"^vmx flags\s*:(.*)$", re.MULTILINE)


class AccelChoice(BaseModel):
    model_config = ConfigDict(frozen=True)

    accel: Accel
    machine_type: str
    cpu_model: str
    reason: str


def kvm_choice(reason: str) -> AccelChoice:
    return AccelChoice(
        accel="kvm", machine_type=KVM_MACHINE_TYPE, cpu_model=KVM_CPU_MODEL, reason=reason
    )


def tcg_choice(reason: str) -> AccelChoice:
    return AccelChoice(
        accel="tcg", machine_type=TCG_MACHINE_TYPE, cpu_model=TCG_CPU_MODEL, reason=reason
    )


def choose_accel(
    *,
    forced: Accel | None = None,
    pvm_guest_kernel: bool = False,
    dev_root: Path = Path("/dev"),
    sys_root: Path = Path("/sys"),
) -> AccelChoice:
    """Decide for this host (or the fixture tree at ``dev_root``/``sys_root``); log why.
    ``forced`` and ``pvm_guest_kernel`` are the operator's settings (``HANGAR_ACCEL``,
    ``HANGAR_PVM_GUEST_KERNEL``)."""
    choice = _decide(dev_root, sys_root, forced, pvm_guest_kernel)
    log.info(
        "guests run with accel=%s machine=%s cpu=%s: %s",
        choice.accel,
        choice.machine_type,
        choice.cpu_model,
        choice.reason,
    )
    return choice


def _decide(
    dev_root: Path, sys_root: Path, forced: Accel | None, pvm_guest_kernel: bool
) -> AccelChoice:
    if forced == "kvm":
        return kvm_choice(f"forced by {FORCE_ENV}=kvm")
    if forced == "tcg":
        return tcg_choice(f"forced by {FORCE_ENV}=tcg")

    kvm_device = dev_root / "kvm"
    try:
        os.close(os.open(kvm_device, os.O_RDWR | os.O_CLOEXEC))
    except OSError as error:
        return tcg_choice(f"{kvm_device} cannot be opened ({error.strerror})")

    if (sys_root / "module" / "kvm_pvm").exists():
        if pvm_guest_kernel:
            return kvm_choice(
                f"KVM is kvm-pvm and {PVM_GUEST_KERNEL_ENV}=1 names a PVM guest kernel"
            )
        return tcg_choice(
            "KVM on this host is kvm-pvm, where a stock guest kernel hangs "
            f"(set {PVM_GUEST_KERNEL_ENV}=1 with a CONFIG_PVM_GUEST kernel to use it)"
        )
    return kvm_choice(f"{kvm_device} opens and KVM is not kvm-pvm")


def gpu_accel(accel: AccelChoice) -> AccelChoice:
    """The choice for a GPU machine: q35 with KVM; VmmError on a TCG host."""
    if accel.accel != "kvm":
        raise VmmError(
            f"GPU machines need KVM: VFIO passthrough does not run under TCG ({accel.reason})",
            field="accel",
            accel=accel.accel,
        )
    return accel.model_copy(update={"machine_type": GPU_MACHINE_TYPE, "cpu_model": KVM_CPU_MODEL})


def host_phys_bits_limit(cpuinfo: str) -> int:
    """The most guest-physical address bits this host can map for a guest.

    The CPU's own width (``address sizes``) bounds it; second-level paging bounds it too:
    Intel's EPT maps 57 bits only with 5-level EPT (``ept_5level`` in ``vmx flags``), AMD's
    NPT walks the host's paging mode (57 bits only with ``la57``); otherwise 48 bits. A
    guest that puts its 64-bit PCI hole above that limit cannot reach its GPUs' BARs.
    """
    match = _ADDRESS_SIZES.search(cpuinfo)
    if match is None:
        raise VmmError("cannot read the CPU's physical address size from /proc/cpuinfo")
    physical = int(match.group(1))
    flags_match = _FLAGS.search(cpuinfo)
    flags = set(flags_match.group(1).split()) if flags_match else set()
    vmx_match = _VMX_FLAGS.search(cpuinfo)
    vmx_flags = set(vmx_match.group(1).split()) if vmx_match else set()
    five_level = "ept_5level" in vmx_flags if "vmx" in flags else "la57" in flags
    return physical if five_level else min(physical, FOUR_LEVEL_PAGING_BITS)
