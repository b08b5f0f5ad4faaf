"""The host's GPUs as the agent handles them: inventory into the GPU store, the record of
each IOMMU group a machine holds, and the device operations the GPU steps call (claim and
bind a group, Fabric Manager partitions, the phases of the handoff, the GPU layout of the
VM). Which GPUs a machine gets is the scheduler's choice (``hangar.agent.placement``).

Every device call here is synchronous and may block until its deadline: each sysfs write
runs in a device worker killed at its deadline (:func:`hangar.devices.killable_sysfs`), as
does each NVML call of the handoff. Steps call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from hangar.devices.fabric import FabricManager, choose_partition
from hangar.devices.groups import GpuGroup, read_gpu_group
from hangar.devices.handoff import GroupClaim, HandoffContext, begin_claim, bind_claim
from hangar.devices.health import AerCounts, read_aer
from hangar.devices.hostpaths import HostPaths
from hangar.devices.inventory import MIG_ON_REASON, HostInventory, read_inventory
from hangar.devices.inventory import Gpu as InventoryGpu
from hangar.devices.nvml import NoNvml, NvmlGpu, NvmlReader, PynvmlReader
from hangar.devices.pci import read_pci_device
from hangar.devices.scrub import TrustedScrubber, bus_reset_scrub_refusal
from hangar.devices.settings import AdminToolsSettings, NvmlSettings, SettingsSource
from hangar.devices.sysfs import SysfsRoot
from hangar.devices.vfio import GroupBinding, release_group
from hangar.devices.worker import killable_sysfs
from hangar.devices.xid import XidEvent
from hangar.errors import DeviceError, InvalidRequest
from hangar.model.gpu import GpuRecord
from hangar.scheduler.mig import check_layout
from hangar.settings import Settings
from hangar.store.protocol import GpuStore
from hangar.vmm.accel import host_phys_bits_limit
from hangar.vmm.gpu_topology import GpuPassthrough, MemoryPlan
from hangar.vmm.hostmem import plan_guest_memory, read_host_memory

log = logging.getLogger(__name__)

VFIO_PCI = "vfio-pci"
ADMIN_TOOLS = "nvidia_gpu_tools.py"
"""NVIDIA's gpu-admin-tools: reads and stages CC and PPCIe modes (the GPU on vfio-pci)."""
FABRIC_TOOL = "fmpm"
"""Fabric Manager's partition tool (shared NVSwitch virtualization mode)."""


class HeldGroup(BaseModel):
    """The agent's record of one IOMMU group a machine holds, from its claim until the
    handoff frees it (``GpuRecord.claim`` of the group's first GPU)."""

    machine_id: str
    claim: GroupClaim
    launched: bool = False
    """The machine's VMM was started with the group: the handoff scrubs it. False: the
    claim never reached launch, and the group only goes back to its host drivers."""
    rebind: bool = False
    """An operator released the group from quarantine: it may be on its host drivers, and
    is bound to vfio-pci again (nothing holding it) before the scrub."""
    device_ids: dict[str, str] = {}
    """The id QEMU gave each of the group's functions in this boot -> its host BDF."""
    guest_addresses: dict[str, str] = {}
    """Where the guest sees each function (QMP ``query-pci``): guest address -> host BDF."""
    xids: list[XidEvent] = []
    """The Xid lines the guest forwarded about the group (or about no known address)."""

    @property
    def lead(self) -> str:
        return self.claim.gpus[0]


def read_held_group(store: GpuStore, lead: str) -> HeldGroup | None:
    record = store.get_gpu(lead)
    if record is None or record.claim is None:
        return None
    return HeldGroup.model_validate(record.claim)


def write_held_group(store: GpuStore, lead: str, held: HeldGroup | None, now: float) -> None:
    """Store (or with None drop) the group's record on its first GPU, in one write."""
    record = store.get_gpu(lead)
    if record is None:
        raise DeviceError(f"GPU {lead} is not in the store", bdf=lead)
    claim = None if held is None else held.model_dump(mode="json")
    store.save_gpu(record.model_copy(update={"claim": claim, "updated_at": now}))


@dataclass
class HostGpus:
    """The devices of this host, read through one sysfs root (``/sys`` or a fixture tree).

    ``handoff_context`` carries what the handoff needs (settings sources, trusted scrubber,
    deadlines, NVML); by default a context over this sysfs with no settings sources, no
    scrubber and NVML skipped. ``fabric``: Fabric Manager, where the host has NVSwitches.
    """

    host_id: str
    sysfs: SysfsRoot
    nvml: NvmlReader = field(default_factory=lambda: NoNvml("NVML not used"))
    handoff_context: HandoffContext | None = None
    fabric: FabricManager | None = None
    cpuinfo: Path | None = None
    """``/proc/cpuinfo`` of this host (default: beside its sysfs)."""

    def __post_init__(self) -> None:
        self.context = self.handoff_context or HandoffContext(
            sysfs=self.sysfs, paths=HostPaths.beside(self.sysfs), nvml_module=""
        )
        # A partition spans groups whose handoffs run side by side: one change at a time.
        self._fabric_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> HostGpus:
        """Every device write killable; NVML, gpu-admin-tools and Fabric Manager where this
        is a real host that has them."""
        root = settings.sysfs_root
        real = root == Path("/sys")
        sysfs = killable_sysfs(root)
        use_nvml = settings.nvml and real
        sources: list[SettingsSource] = [NvmlSettings()] if use_nvml else []
        tools = shutil.which(ADMIN_TOOLS) if real else None
        if tools is not None:
            sources.append(AdminToolsSettings((tools,)))
        elif real:
            log.warning(
                "%s not found: confidential-computing and protected-PCIe modes a tenant "
                "stages are not checked at the handoff",
                ADMIN_TOOLS,
            )
        fabric_tool = shutil.which(FABRIC_TOOL) if real else None
        context = HandoffContext(
            sysfs=sysfs,
            paths=HostPaths.beside(sysfs),
            settings_sources=sources,
            nvml_module="pynvml" if use_nvml else "",
        )
        return cls(
            host_id=settings.host_id,
            sysfs=sysfs,
            nvml=PynvmlReader() if use_nvml else NoNvml("NVML off or fixture sysfs"),
            handoff_context=context,
            fabric=FabricManager((fabric_tool,)) if fabric_tool is not None else None,
        )

    @property
    def paths(self) -> HostPaths:
        return self.context.paths

    @property
    def trusted_scrubber(self) -> TrustedScrubber | None:
        return self.context.trusted_scrubber

    # inventory
    def inventory(self) -> HostInventory:
        return read_inventory(self.sysfs, nvml=self.nvml, paths=self.paths)

    def register(self, store: GpuStore, inventory: HostInventory | None = None) -> list[GpuRecord]:
        """Record every GPU of the inventory in the store (claims and quarantine are kept).
        A group whose memory neither a bus reset nor a trusted scrubber can clear is never
        offered: its first tenant's data would stay for the next."""
        records = []
        scrub_problems: dict[int, str | None] = {}
        for gpu in (inventory or self.inventory()).gpus:
            layout = self._mig_layout(gpu)
            reason = "; ".join(
                text for text in gpu.unavailable_reasons if not (layout and text == MIG_ON_REASON)
            )
            if gpu.available and gpu.iommu_group is not None:
                if gpu.iommu_group not in scrub_problems:
                    scrub_problems[gpu.iommu_group] = self._scrub_problem(gpu.iommu_group)
                problem = scrub_problems[gpu.iommu_group]
                if problem is not None:
                    reason = f"its memory cannot be scrubbed between tenants: {problem}"
            records.append(
                store.upsert_gpu_inventory(
                    GpuRecord(
                        host_id=self.host_id,
                        bdf=gpu.bdf,
                        kind=gpu.kind.name,
                        numa_node=gpu.numa_node,
                        nvlink_domain=gpu.nvlink_domain,
                        iommu_group=gpu.iommu_group,
                        module_id=self._module_id(store, gpu.bdf, gpu.nvml),
                        available=not reason,
                        reason=reason,
                        mig_layout=list(layout),
                    )
                )
            )
        return records

    def _mig_layout(self, gpu: InventoryGpu) -> tuple[str, ...]:
        """The MIG instances NVML reports on a GPU in MIG mode, by GPU-instance profile; none
        (and the GPU stays unavailable) where the layout is not one hangar knows."""
        if gpu.mig_mode != "enabled" or not gpu.mig_instances:
            return ()
        profiles = [instance.gpu_instance_profile for instance in gpu.mig_instances]
        if any(profile is None for profile in profiles):
            log.warning("host %s GPU %s: a MIG instance without a profile", self.host_id, gpu.bdf)
            return ()
        layout = tuple(profile for profile in profiles if profile is not None)
        try:
            check_layout(gpu.kind.name, layout)
        except InvalidRequest as error:
            log.warning("host %s GPU %s: MIG layout not offered: %s", self.host_id, gpu.bdf, error)
            return ()
        return layout

    @staticmethod
    def _module_id(store: GpuStore, bdf: str, nvml: NvmlGpu | None) -> int | None:
        """NVML's module id; the one recorded before while NVML cannot see the GPU (on
        vfio-pci for a running machine when the agent restarts)."""
        if nvml is not None and nvml.module_id is not None:
            return nvml.module_id
        known = store.get_gpu(bdf)
        return known.module_id if known is not None else None

    def _scrub_problem(self, iommu_group: int) -> str | None:
        if self.trusted_scrubber is not None:
            return None
        refusal = bus_reset_scrub_refusal(self.sysfs, read_gpu_group(self.sysfs, iommu_group))
        return None if refusal is None else f"{refusal}, and no trusted scrubber is configured"

    def fabric_partitions(
        self, inventory: HostInventory | None = None
    ) -> dict[int, list[int]] | None:
        """Fabric Manager's partitions (id -> module ids) on a host with NVSwitches; an
        empty map when they cannot be read (several GPUs are then never claimed together,
        a lone GPU boots with NVLink off); None on a host without an NVSwitch fabric."""
        inventory = inventory or self.inventory()
        if not inventory.nvswitches:
            return None
        if self.fabric is None:
            log.warning(
                "host %s has NVSwitches but no Fabric Manager (%s)", self.host_id, FABRIC_TOOL
            )
            return {}
        try:
            return {p.partition_id: p.module_ids for p in self.fabric.partitions()}
        except DeviceError as error:
            log.warning("host %s: Fabric Manager's partitions unreadable: %s", self.host_id, error)
            return {}

    # claims
    def group(self, iommu_group: int) -> GpuGroup:
        return read_gpu_group(self.sysfs, iommu_group)

    def begin(self, iommu_group: int) -> GroupClaim:
        """The group can go to a tenant now (usable, nothing holds a GPU of it: retryable
        ``device_held`` otherwise), with its AER baseline."""
        return begin_claim(self.sysfs, self.paths, self.group(iommu_group))

    def bind(self, claim: GroupClaim) -> GroupClaim:
        return bind_claim(self.sysfs, self.paths, claim)

    def on_vfio(self, bdfs: Sequence[str]) -> bool:
        return all(read_pci_device(self.sysfs, bdf).driver == VFIO_PCI for bdf in bdfs)

    def drivers(self, bdfs: Sequence[str]) -> dict[str, str | None]:
        return {bdf: read_pci_device(self.sysfs, bdf).driver for bdf in bdfs}

    def taken_by_vfio(self, bdfs: Sequence[str]) -> bool:
        """Whether any of these functions is on vfio-pci or set to go there."""
        for bdf in bdfs:
            device = read_pci_device(self.sysfs, bdf)
            if VFIO_PCI in (device.driver, device.driver_override):
                return True
        return False

    def aer_baseline(self, bdfs: Sequence[str]) -> dict[str, AerCounts]:
        """AER counters now (an operator vouching for a quarantined group)."""
        return {bdf: aer for bdf in bdfs if (aer := read_aer(self.sysfs, bdf)) is not None}

    # NVLink
    def activate_partition(self, partition_id: int, module_ids: Sequence[int]) -> None:
        """Activate the Fabric Manager partition made of exactly these modules, as Fabric
        Manager itself lists it (the scheduler's choice, checked); idempotent for a resumed
        step."""
        if self.fabric is None:
            raise DeviceError(
                f"several NVSwitch GPUs need a Fabric Manager partition and {FABRIC_TOOL} "
                "is not available on this host",
                reason="fabric_unavailable",
            )
        with self._fabric_lock:
            listed = self.fabric.partitions()
            mine = next((p for p in listed if p.partition_id == partition_id), None)
            if mine is not None and mine.active and sorted(mine.module_ids) == sorted(module_ids):
                return
            chosen = choose_partition(listed, module_ids, len(module_ids))
            if chosen is None or chosen.partition_id != partition_id:
                raise DeviceError(
                    f"Fabric Manager has no inactive partition {partition_id} of modules "
                    f"{sorted(module_ids)}",
                    reason="fabric_mismatch",
                    partition_id=partition_id,
                )
            self.fabric.activate(partition_id)

    def deactivate_partition(self, partition_id: int) -> None:
        """Idempotent: each group of the partition's machine deactivates it at its handoff."""
        if self.fabric is None:
            raise DeviceError(
                f"partition {partition_id} is to be deactivated and {FABRIC_TOOL} is not "
                "available on this host",
                reason="fabric_unavailable",
                partition_id=partition_id,
            )
        with self._fabric_lock:
            self.fabric.deactivate(partition_id)

    # the VM's GPU layout
    def passthrough(self, groups: Sequence[GpuGroup]) -> list[GpuPassthrough]:
        """Each GPU with its BARs and the companions of its slot, as QEMU gets them."""
        found = []
        for group in groups:
            for gpu in group.gpus:
                function = next(f for f in group.functions if f.bdf == gpu)
                found.append(
                    GpuPassthrough(
                        bdf=gpu,
                        numa_node=read_pci_device(self.sysfs, gpu).numa_node,
                        bar_bytes=function.bar_bytes,
                        companions=group.companions_of(gpu),
                    )
                )
        return found

    def memory_plan(self, memory_mb: int, cpus: int, gpu_nodes: Sequence[int | None]) -> MemoryPlan:
        """Guest memory on the GPUs' NUMA nodes, from the huge pages free there now."""
        return plan_guest_memory(memory_mb, cpus, gpu_nodes, read_host_memory(self.sysfs.root))

    def phys_bits(self) -> int:
        """The guest-physical address bits this host can map (CPU and EPT/NPT)."""
        cpuinfo = self.cpuinfo or (
            self.paths.proc / "cpuinfo" if self.paths.proc is not None else Path("/proc/cpuinfo")
        )
        try:
            text = cpuinfo.read_text()
        except OSError as error:
            raise DeviceError(
                f"cannot read {cpuinfo}: {error.strerror}", path=str(cpuinfo)
            ) from error
        return host_phys_bits_limit(text)

    # the handoff
    def release(self, binding: GroupBinding) -> None:
        """Give the group back to the drivers it had before hangar took it, and check it."""
        release_group(self.sysfs, binding)
        wrong = [
            f"{function.bdf} is on {driver!r}, expected {function.original_driver!r}"
            for function in binding.functions
            if function.original_known
            and (driver := read_pci_device(self.sysfs, function.bdf).driver)
            != function.original_driver
        ]
        if wrong:
            raise DeviceError(
                f"IOMMU group {binding.iommu_group} did not return to its host drivers: "
                + "; ".join(wrong),
                reason="host_drivers_not_restored",
                iommu_group=binding.iommu_group,
            )
