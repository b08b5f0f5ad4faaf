"""A host's GPUs and NVSwitches, and whether each GPU can go to a VM by VFIO.

Built from sysfs, with NVML's view (UUIDs, memory, MIG) merged in by PCI address when
the driver answers. ``available`` says whether a GPU is fit for passthrough on this
host (IOMMU, vfio-pci, QEMU, a clean group, a reset method, MIG off); whether it is
free or claimed is the store's business.
"""

from __future__ import annotations

from pydantic import BaseModel, computed_field

from hangar.devices.groups import read_gpu_group
from hangar.devices.hostpaths import HostPaths
from hangar.devices.iommu import (
    GroupMember,
    classify_functions,
    group_bdfs,
    iommu_groups_present,
)
from hangar.devices.nvml import (
    MigInstance,
    MigMode,
    NvmlGpu,
    NvmlReader,
    NvmlReport,
    PynvmlReader,
)
from hangar.devices.pci import NVIDIA_VENDOR_ID, PciDevice, list_pci_devices
from hangar.devices.readiness import (
    QEMU_BINARY,
    CommandRunner,
    HypervisorStatus,
    SubprocessRunner,
    VfioStatus,
    probe_hypervisor,
    probe_vfio,
)
from hangar.devices.reset import reset_method_problem
from hangar.devices.sysfs import SysfsRoot
from hangar.devices.topology import NvlinkPlacement, NvlinkSource, nvlink_domains
from hangar.model.gpu_kinds import GpuKind, gpu_kind_for_device_id, nvswitch_name, unknown_gpu_kind

IOMMU_OFF = "IOMMU is off on this host (no IOMMU groups): VFIO cannot pass GPUs through"


class NvSwitch(BaseModel):
    """An NVSwitch on an SXM baseboard: part of the NVLink fabric, never offered as a GPU."""

    bdf: str
    name: str
    pci_id: str
    numa_node: int | None
    driver: str | None


class Gpu(BaseModel):
    bdf: str
    kind: GpuKind
    pci: PciDevice
    numa_node: int | None
    iommu_group: int | None
    group_members: list[GroupMember]
    """Every function of the GPU's IOMMU group, the GPU included."""
    driver: str | None
    nvlink_domain: str | None = None
    """GPUs with the same id share NVLink (one HGX board); None: no NVLink known."""
    nvswitches: list[str] = []
    nvlink_source: NvlinkSource | None = None
    nvlink_peers: list[str] = []
    uuid: str | None = None
    product_name: str | None = None
    memory_total_bytes: int | None = None
    mig_mode: MigMode = "unknown"
    mig_mode_pending: MigMode | None = None
    mig_instances: list[MigInstance] = []
    """Slices for the sandbox tier; never passed to VFIO."""
    nvml: NvmlGpu | None = None
    """NVML's whole report (ECC, row remapping, recovery action, fabric state, module id);
    None when NVML does not see the GPU."""
    nvml_errors: list[str] = []
    available: bool
    """Fit for VFIO passthrough on this host."""
    unavailable_reasons: list[str] = []

    @computed_field  # type: ignore[prop-decorator]
    @property
    def unavailable_reason(self) -> str | None:
        return "; ".join(self.unavailable_reasons) or None


class NvmlStatus(BaseModel):
    available: bool
    reason: str | None = None
    driver_version: str | None = None
    errors: list[str] = []


class HostInventory(BaseModel):
    gpus: list[Gpu]
    nvswitches: list[NvSwitch]
    iommu_enabled: bool
    vfio: VfioStatus
    hypervisor: HypervisorStatus
    reasons: list[str]
    """Host-wide reasons no GPU can be passed through (empty when the host is ready)."""
    nvml_status: NvmlStatus

    @computed_field  # type: ignore[prop-decorator]
    @property
    def vfio_available(self) -> bool:
        return self.vfio.available

    @property
    def available_gpus(self) -> list[Gpu]:
        return [gpu for gpu in self.gpus if gpu.available]


def read_inventory(
    sysfs: SysfsRoot | None = None,
    *,
    nvml: NvmlReader | None = None,
    runner: CommandRunner | None = None,
    hypervisor_binary: str = QEMU_BINARY,
    paths: HostPaths | None = None,
) -> HostInventory:
    """Inventory the host. Reads only: nothing is written to sysfs and NVML is only queried.
    ``paths`` locates the host's ``/dev`` and ``/proc`` (by default beside the sysfs root)."""
    sysfs = sysfs or SysfsRoot()
    runner = runner or SubprocessRunner()
    devices = list_pci_devices(sysfs)
    by_bdf = {device.bdf: device for device in devices}
    nvidia = [device for device in devices if device.vendor_id == NVIDIA_VENDOR_ID]
    switches = [device for device in nvidia if nvswitch_name(device.device_id) is not None]
    gpu_devices = [
        device for device in nvidia if device.is_display and nvswitch_name(device.device_id) is None
    ]

    iommu_enabled = iommu_groups_present(sysfs) or any(
        device.iommu_group is not None for device in devices
    )
    vfio = probe_vfio(sysfs, runner, paths)
    hypervisor = probe_hypervisor(runner, hypervisor_binary)
    host_reasons = _host_reasons(iommu_enabled, vfio, hypervisor)

    report = (nvml or PynvmlReader()).read()
    kinds = {device.bdf: _kind(device) for device in gpu_devices}
    placements = nvlink_domains(
        [(bdf, kind) for bdf, kind in kinds.items()],
        [switch.bdf for switch in switches],
        {gpu.bus_id: gpu.nvlink_peers for gpu in report.gpus},
    )
    gpus = [
        _gpu(
            device,
            kinds[device.bdf],
            _group_members(sysfs, device, by_bdf),
            _group_problems(sysfs, device),
            placements[device.bdf],
            report.gpu_at(device.bdf),
            host_reasons,
        )
        for device in gpu_devices
    ]
    return HostInventory(
        gpus=gpus,
        nvswitches=[_nvswitch(device) for device in switches],
        iommu_enabled=iommu_enabled,
        vfio=vfio,
        hypervisor=hypervisor,
        reasons=host_reasons,
        nvml_status=_nvml_status(report, {device.bdf for device in gpu_devices}),
    )


def _kind(device: PciDevice) -> GpuKind:
    return gpu_kind_for_device_id(device.device_id) or unknown_gpu_kind(device.device_id)


def _host_reasons(iommu_enabled: bool, vfio: VfioStatus, hypervisor: HypervisorStatus) -> list[str]:
    reasons = []
    if not iommu_enabled:
        reasons.append(IOMMU_OFF)
    if not vfio.available:
        reasons.append(vfio.detail)
    if not hypervisor.available:
        reasons.append(hypervisor.detail)
    return reasons


def _group_members(
    sysfs: SysfsRoot, device: PciDevice, by_bdf: dict[str, PciDevice]
) -> list[GroupMember]:
    if device.iommu_group is None:
        return classify_functions([device])
    in_group = [by_bdf[bdf] for bdf in group_bdfs(sysfs, device.iommu_group) if bdf in by_bdf]
    return classify_functions(in_group or [device])


def _group_problems(sysfs: SysfsRoot, device: PciDevice) -> list[str]:
    """Why the GPU's group cannot go to a tenant: foreign members, or any member (the GPU,
    an HD-audio companion) that cannot be reset between tenants."""
    if device.iommu_group is None:
        problem = reset_method_problem(device.reset_methods)
        return [] if problem is None else [f"cannot be reset between tenants: {problem}"]
    return read_gpu_group(sysfs, device.iommu_group).problems


MIG_ON_REASON = "MIG mode is on: its instances serve the sandbox tier, not VFIO"


def _gpu(
    device: PciDevice,
    kind: GpuKind,
    members: list[GroupMember],
    group_problems: list[str],
    placement: NvlinkPlacement,
    nvml: NvmlGpu | None,
    host_reasons: list[str],
) -> Gpu:
    reasons = list(host_reasons)
    if device.iommu_group is None and IOMMU_OFF not in reasons:
        reasons.append("no IOMMU group for this GPU")
    reasons.extend(group_problems)
    if nvml is not None and nvml.mig_mode == "enabled":
        reasons.append(MIG_ON_REASON)
    return Gpu(
        bdf=device.bdf,
        kind=kind,
        pci=device,
        numa_node=device.numa_node,
        iommu_group=device.iommu_group,
        group_members=members,
        driver=device.driver,
        nvlink_domain=placement.domain,
        nvswitches=placement.nvswitches,
        nvlink_source=placement.source,
        nvlink_peers=nvml.nvlink_peers if nvml else [],
        uuid=nvml.uuid if nvml else None,
        product_name=nvml.name if nvml else None,
        memory_total_bytes=nvml.memory_total_bytes if nvml else None,
        mig_mode=nvml.mig_mode if nvml else "unknown",
        mig_mode_pending=nvml.mig_mode_pending if nvml else None,
        mig_instances=nvml.mig_instances if nvml else [],
        nvml=nvml,
        nvml_errors=nvml.errors if nvml else [],
        available=not reasons,
        unavailable_reasons=reasons,
    )


def _nvswitch(device: PciDevice) -> NvSwitch:
    return NvSwitch(
        bdf=device.bdf,
        name=nvswitch_name(device.device_id) or "nvswitch",
        pci_id=device.pci_id,
        numa_node=device.numa_node,
        driver=device.driver,
    )


def _nvml_status(report: NvmlReport, gpu_bdfs: set[str]) -> NvmlStatus:
    unmatched = [
        f"NVML reports a GPU at {gpu.bus_id} that sysfs does not list"
        for gpu in report.gpus
        if gpu.bus_id not in gpu_bdfs
    ]
    return NvmlStatus(
        available=report.available,
        reason=report.reason,
        driver_version=report.driver_version,
        errors=[*report.errors, *unmatched],
    )
