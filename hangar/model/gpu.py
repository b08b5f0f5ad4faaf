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
    binding: dict[str, Any] | None = None
    """The devices layer's GroupBinding while hangar holds the group on vfio-pci."""
    available: bool = True
    """Fit for passthrough on this host (clean IOMMU group, resettable, MIG off)."""
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
