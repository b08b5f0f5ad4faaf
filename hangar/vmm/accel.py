"""Choosing how a host runs guests: KVM where it works for a stock kernel, TCG otherwise.

The choice also fixes the machine type and CPU model: microvm boots fastest, but under
TCG it hangs before the kernel prints anything in about one boot in six, so TCG uses q35.
A kvm-pvm host (``/sys/module/kvm_pvm``) serves ``/dev/kvm`` only to guests built with
``CONFIG_PVM_GUEST``; a stock guest kernel hangs there, so such a host gets TCG unless
``HANGAR_PVM_GUEST_KERNEL=1`` says the guest kernel is a PVM one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from hangar.settings import env_name

log = logging.getLogger(__name__)

FORCE_ENV = env_name("accel")
PVM_GUEST_KERNEL_ENV = env_name("pvm_guest_kernel")
Accel = Literal["kvm", "tcg"]

KVM_MACHINE_TYPE = "microvm,isa-serial=on,pcie=on"
TCG_MACHINE_TYPE = "q35"
KVM_CPU_MODEL = "host"
TCG_CPU_MODEL = "max"


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
