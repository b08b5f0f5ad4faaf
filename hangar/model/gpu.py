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
    host_id: str
    bdf: str
    kind: str
    numa_node: int | None = None
    nvlink_domain: str | None = None
    iommu_group: int | None = None
    state: GpuState = GpuState.FREE
    machine_id: str = ""
    binding: dict[str, Any] | None = None
    """The devices layer's GroupBinding while hangar holds the group on vfio-pci."""
    available: bool = True
    """Fit for passthrough on this host (clean IOMMU group, resettable, MIG off)."""
    reason: str = ""
    """Why the GPU is quarantined or unavailable."""
    updated_at: float = 0.0


class GpuEvent(BaseModel):
    bdf: str
    timestamp: float
    action: str
    actor: str
    detail: dict[str, Any] = Field(default_factory=dict)
