"""A host GPU as the store tracks it: where it is, and who may use it."""

from __future__ import annotations

import enum
from typing import Any

from pydantic import BaseModel, Field


class GpuState(enum.StrEnum):
    FREE = "free"
    CLAIMED = "claimed"
    CLEANING = "cleaning"
    QUARANTINED = "quarantined"


class GpuRecord(BaseModel):
    """What the host agent knows of one GPU. Its claim state (free, claimed, cleaning,
    quarantined) and holder are in the host's claim record, where placement reads them."""

    host_id: str
    bdf: str
    kind: str
    numa_node: int | None = None
    nvlink_domain: str | None = None
    iommu_group: int | None = None
    """GPUs that share an IOMMU group are one claim unit: one tenant gets all or none."""
    module_id: int | None = None
    """The GPU's slot on an NVSwitch baseboard (NVML's module id): Fabric Manager
    partitions name GPUs by it."""
    claim: dict[str, Any] | None = None
    """While a machine holds this GPU's IOMMU group, from its claim until the handoff frees
    it: the agent's record of the group (``hangar.agent.gpus.HeldGroup``: the devices
    layer's GroupClaim with its VFIO binding and AER baseline, whether the machine reached
    launch, the guest's addresses and Xids). Kept on the group's first GPU."""
    binding: dict[str, Any] | None = None
    """A per-GPU GroupBinding as agents stored it before group claims; a handoff that finds
    one (and no ``claim``) scrubs the group as one that reached launch."""
    available: bool = True
    """Fit for passthrough on this host (clean IOMMU group, resettable, MIG off), or, with
    MIG on, for its MIG instances."""
    mig_layout: list[str] = []
    """With MIG on: the profile of each MIG instance NVML reports (the operator's layout),
    in NVML's order; the sandbox tier's slices are these instances."""
    reason: str = ""
    """Why the GPU is unavailable (from the inventory)."""
    quarantine_reason: str = ""
    """Why the last handoff quarantined it (kept until an operator releases it)."""
    updated_at: float = 0.0


class GpuEvent(BaseModel):
    bdf: str
    timestamp: float
    action: str
    actor: str
    detail: dict[str, Any] = Field(default_factory=dict)
    iommu_group: int | None = None
    """The IOMMU group the GPU was claimed, handed off or quarantined with."""
