"""The GPU kinds hangar knows, by NVIDIA PCI device id, with what the handoff needs to
know about each architecture: where its firmware reports boot and memory clear done."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

FormFactor = Literal["pcie", "sxm", "unknown"]
Architecture = Literal["ampere", "ada", "hopper", "unknown"]
NvlinkAttachment = Literal["baseboard", "bridge", "none", "unknown"]
"""How a kind's NVLinks reach peers: through an SXM baseboard (NVSwitches on 8-GPU boards,
direct links on 4-GPU boards), through bridges between PCIe cards, or not at all."""


class MemoryClearRegisters(BaseModel):
    """BAR0 registers that say the GPU's firmware finished booting after a reset and
    finished clearing the memory (what NVIDIA's gpu-admin-tools polls after an SBR)."""

    model_config = ConfigDict(frozen=True)

    boot_offset: int
    boot_done: int
    """The whole register equals this once the firmware has booted."""
    clear_offset: int
    clear_mask: int
    """The register ANDed with this is non-zero once memory is cleared."""


# Turing to Hopper: memory clear done in bit 0 of 0x100b20. Boot done: Hopper's FSP writes
# 0xff to its scratch register 0x200bc; before Hopper, 0x118234 reads 0x3ff.
_PRE_HOPPER_CLEAR = MemoryClearRegisters(
    boot_offset=0x118234, boot_done=0x3FF, clear_offset=0x100B20, clear_mask=0x1
)
_HOPPER_CLEAR = MemoryClearRegisters(
    boot_offset=0x200BC, boot_done=0xFF, clear_offset=0x100B20, clear_mask=0x1
)
MEMORY_CLEAR_REGISTERS: dict[str, MemoryClearRegisters] = {
    "ampere": _PRE_HOPPER_CLEAR,
    "ada": _PRE_HOPPER_CLEAR,
    "hopper": _HOPPER_CLEAR,
}


class GpuKind(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    pci_device_ids: list[int]
    """NVIDIA (vendor 10de) device ids that report this kind."""
    memory_gb: int | None
    mig_capable: bool
    form_factor: FormFactor
    nvlink: NvlinkAttachment
    architecture: Architecture = "unknown"
    known: bool = True

    @property
    def pci_ids(self) -> list[str]:
        return [f"10de:{device_id:04x}" for device_id in self.pci_device_ids]

    @property
    def memory_clear(self) -> MemoryClearRegisters | None:
        """None: hangar does not know how this kind reports a firmware memory clear."""
        return MEMORY_CLEAR_REGISTERS.get(self.architecture)


GPU_KINDS: tuple[GpuKind, ...] = (
    GpuKind(
        name="a10",
        pci_device_ids=[0x2236],
        memory_gb=24,
        mig_capable=False,
        form_factor="pcie",
        nvlink="none",
        architecture="ampere",
    ),
    GpuKind(
        name="l40s",
        pci_device_ids=[0x26B9],
        memory_gb=48,
        mig_capable=False,
        form_factor="pcie",
        nvlink="none",
        architecture="ada",
    ),
    GpuKind(
        name="a100-pcie-40gb",
        pci_device_ids=[0x20B1, 0x20F1],
        memory_gb=40,
        mig_capable=True,
        form_factor="pcie",
        nvlink="bridge",
        architecture="ampere",
    ),
    GpuKind(
        name="a100-pcie-80gb",
        pci_device_ids=[0x20B5],
        memory_gb=80,
        mig_capable=True,
        form_factor="pcie",
        nvlink="bridge",
        architecture="ampere",
    ),
    GpuKind(
        name="a100-sxm4-40gb",
        pci_device_ids=[0x20B0],
        memory_gb=40,
        mig_capable=True,
        form_factor="sxm",
        nvlink="baseboard",
        architecture="ampere",
    ),
    GpuKind(
        name="a100-sxm4-80gb",
        pci_device_ids=[0x20B2],
        memory_gb=80,
        mig_capable=True,
        form_factor="sxm",
        nvlink="baseboard",
        architecture="ampere",
    ),
    GpuKind(
        name="h100-pcie",
        pci_device_ids=[0x2331],
        memory_gb=80,
        mig_capable=True,
        form_factor="pcie",
        nvlink="bridge",
        architecture="hopper",
    ),
    GpuKind(
        name="h100-sxm",
        pci_device_ids=[0x2330],
        memory_gb=80,
        mig_capable=True,
        form_factor="sxm",
        nvlink="baseboard",
        architecture="hopper",
    ),
    GpuKind(
        name="h100-nvl",
        pci_device_ids=[0x2321],
        memory_gb=94,
        mig_capable=True,
        form_factor="pcie",
        nvlink="bridge",
        architecture="hopper",
    ),
    GpuKind(
        name="h200",
        pci_device_ids=[0x2335],
        memory_gb=141,
        mig_capable=True,
        form_factor="sxm",
        nvlink="baseboard",
        architecture="hopper",
    ),
    GpuKind(
        name="h200-nvl",
        pci_device_ids=[0x233B],
        memory_gb=141,
        mig_capable=True,
        form_factor="pcie",
        nvlink="bridge",
        architecture="hopper",
    ),
)

NVSWITCH_NAMES: dict[int, str] = {
    0x1AF1: "nvswitch-gen2",  # HGX A100 baseboards
    0x22A3: "nvswitch-gen3",  # HGX H100 / H200 baseboards
}

_KINDS_BY_DEVICE_ID = {device_id: kind for kind in GPU_KINDS for device_id in kind.pci_device_ids}
_KINDS_BY_NAME = {kind.name: kind for kind in GPU_KINDS}


def gpu_kind_for_device_id(device_id: int) -> GpuKind | None:
    return _KINDS_BY_DEVICE_ID.get(device_id)


def gpu_kind_named(name: str) -> GpuKind | None:
    return _KINDS_BY_NAME.get(name)


def unknown_gpu_kind(device_id: int) -> GpuKind:
    """A kind for an NVIDIA GPU the catalog lacks: listed, named by its PCI id."""
    return GpuKind(
        name=f"unknown-10de:{device_id:04x}",
        pci_device_ids=[device_id],
        memory_gb=None,
        mig_capable=False,
        form_factor="unknown",
        nvlink="unknown",
        known=False,
    )


def nvswitch_name(device_id: int) -> str | None:
    return NVSWITCH_NAMES.get(device_id)
