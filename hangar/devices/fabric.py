"""NVLink on HGX boards: disabled for single-GPU machines, Fabric Manager partitions for more.

On an NVSwitch baseboard a GPU's driver waits for the fabric (Fabric Manager) before CUDA
can start; a GPU passed through alone, with no partition activated for it, hangs at
"fabric state: in progress". So:

- a machine that gets **one** GPU of a baseboard kind boots with NVLink disabled in its
  guest driver (:func:`nvlink_disabled_for`; the guest init passes
  ``NVreg_NvLinkDisable=1`` when the kernel command line has
  :data:`hangar.images.driver_bundle.NVLINK_OFF_KERNEL_ARG`);
- a machine that gets **several** gets a Fabric Manager partition of exactly that many
  GPUs, activated before boot and deactivated at the handoff. Partitions name GPUs by
  module id (the baseboard slot, NVML's ``module_id``), never by PCI address order; the
  scheduler places by partition (:func:`choose_partition`).

The partition tool is Fabric Manager's ``fmpm`` (shared NVSwitch virtualization mode):
``fmpm -l`` lists partitions as JSON, ``fmpm -a ID`` activates, ``fmpm -d ID``
deactivates. Each call runs with the ``command_s`` deadline.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence

from pydantic import BaseModel, ConfigDict

from hangar.devices.pci import normalize_bdf
from hangar.devices.readiness import CommandRunner, VendorTool
from hangar.devices.worker import DeviceDeadlines
from hangar.errors import DeviceError
from hangar.model.gpu_kinds import GpuKind


class FabricPartition(BaseModel):
    model_config = ConfigDict(frozen=True)

    partition_id: int
    active: bool
    module_ids: list[int]
    """The GPUs' physical ids (baseboard module ids), sorted."""
    pci_bus_ids: list[str]
    """As Fabric Manager reports them; for display only, never for placement."""

    @property
    def gpu_count(self) -> int:
        return len(self.module_ids)


def nvlink_disabled_for(kind: GpuKind, gpu_count: int) -> bool:
    """A lone GPU of a baseboard kind (SXM with NVSwitches) boots with NVLink off."""
    return kind.nvlink == "baseboard" and gpu_count == 1


def parse_partitions(text: str) -> list[FabricPartition]:
    """``fmpm -l`` output: ``{"partitionInfo": [{"partitionId", "isActive", "gpuInfo":
    [{"physicalId", "pciBusId", ...}]}]}``."""
    try:
        listing = json.loads(text)
        partitions = []
        for entry in listing["partitionInfo"]:
            gpus = entry.get("gpuInfo", [])
            partitions.append(
                FabricPartition(
                    partition_id=int(entry["partitionId"]),
                    active=bool(entry.get("isActive", 0)),
                    module_ids=sorted(int(gpu["physicalId"]) for gpu in gpus),
                    pci_bus_ids=[
                        normalize_bdf(str(gpu["pciBusId"])) for gpu in gpus if gpu.get("pciBusId")
                    ],
                )
            )
    except (ValueError, KeyError, TypeError, DeviceError) as error:
        raise DeviceError(
            f"cannot read Fabric Manager's partition list: {error}", reason="fabric_unreadable"
        ) from error
    return sorted(partitions, key=lambda partition: partition.partition_id)


def choose_partition(
    partitions: Iterable[FabricPartition], free_module_ids: Iterable[int], count: int
) -> FabricPartition | None:
    """The inactive partition of exactly ``count`` GPUs, all free, with the lowest id."""
    free = set(free_module_ids)
    fitting = [
        p for p in partitions if not p.active and p.gpu_count == count and set(p.module_ids) <= free
    ]
    return min(fitting, key=lambda p: p.partition_id, default=None)


def partition_bdfs(partition: FabricPartition, module_bdfs: Mapping[int, str]) -> list[str]:
    """The host GPUs of a partition, by module id (from NVML's ``module_id`` per GPU)."""
    missing = [module for module in partition.module_ids if module not in module_bdfs]
    if missing:
        raise DeviceError(
            f"partition {partition.partition_id} names module ids {missing} that no GPU on "
            "this host reports",
            reason="fabric_mismatch",
            partition_id=partition.partition_id,
        )
    return [module_bdfs[module] for module in partition.module_ids]


class FabricManager:
    """Fabric Manager's partitions through ``fmpm``, each call with a deadline."""

    def __init__(
        self,
        tool: Sequence[str] = ("fmpm",),
        runner: CommandRunner | None = None,
        deadlines: DeviceDeadlines | None = None,
    ) -> None:
        self.tool = VendorTool(tool, runner, (deadlines or DeviceDeadlines()).command_s)

    def _run(self, *args: str) -> str:
        return self.tool.run(*args, reason="fabric_failed").stdout

    def partitions(self) -> list[FabricPartition]:
        return parse_partitions(self._run("-l"))

    def activate(self, partition_id: int) -> None:
        """Before boot. Idempotent: an active partition is left as it is."""
        if self._state(partition_id).active:
            return
        self._run("-a", str(partition_id))
        if not self._state(partition_id).active:
            raise DeviceError(
                f"partition {partition_id} is not active after activation",
                reason="fabric_failed",
                partition_id=partition_id,
            )

    def deactivate(self, partition_id: int) -> None:
        """At the handoff, before the reset. Idempotent."""
        if not self._state(partition_id).active:
            return
        self._run("-d", str(partition_id))

    def _state(self, partition_id: int) -> FabricPartition:
        for partition in self.partitions():
            if partition.partition_id == partition_id:
                return partition
        raise DeviceError(
            f"Fabric Manager has no partition {partition_id}",
            reason="fabric_mismatch",
            partition_id=partition_id,
        )
