"""The ``hangar host inspect`` report: readiness, GPUs, groups, NVSwitches, MIG slices."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from hangar.devices.inventory import Gpu, HostInventory

_GIB = 1024**3


def render_inspect_report(inventory: HostInventory) -> Group:
    parts: list[RenderableType] = [_readiness_table(inventory)]
    if not inventory.gpus:
        parts.append(Text("No NVIDIA GPU found on this host.", style="bold yellow"))
    else:
        parts.append(_gpu_table(inventory.gpus))
        parts.extend(_unavailable_lines(inventory.gpus))
        parts.extend(_shared_groups(inventory.gpus))
    if inventory.nvswitches:
        parts.append(_nvswitch_table(inventory))
    if any(gpu.mig_instances for gpu in inventory.gpus):
        parts.append(_mig_table(inventory.gpus))
    return Group(*parts)


def _yes_no(ok: bool, yes: str, no: str) -> Text:
    return Text(yes, style="green") if ok else Text(no, style="red")


def _readiness_table(inventory: HostInventory) -> Table:
    table = Table(title="Host readiness for GPU machines", show_header=True)
    table.add_column("check")
    table.add_column("state")
    table.add_column("detail")
    table.add_row(
        "IOMMU",
        _yes_no(inventory.iommu_enabled, "enabled", "off"),
        "" if inventory.iommu_enabled else "no IOMMU groups in sysfs",
    )
    table.add_row(
        "VFIO",
        _yes_no(inventory.vfio.available, "ready", "not ready"),
        inventory.vfio.detail,
    )
    table.add_row(
        "hypervisor",
        _yes_no(inventory.hypervisor.available, "ready", "missing"),
        inventory.hypervisor.detail,
    )
    nvml = inventory.nvml_status
    table.add_row(
        "NVML",
        _yes_no(nvml.available, "available", "unavailable"),
        f"driver {nvml.driver_version}" if nvml.available else (nvml.reason or ""),
    )
    for error in nvml.errors:
        table.add_row("", "", Text(error, style="yellow"))
    return table


def _memory(gpu: Gpu) -> str:
    if gpu.memory_total_bytes is not None:
        return f"{gpu.memory_total_bytes / _GIB:.1f} GiB"
    if gpu.kind.memory_gb is not None:
        return f"{gpu.kind.memory_gb} GB"
    return "?"


def _gpu_table(gpus: list[Gpu]) -> Table:
    table = Table(title="GPUs", show_header=True)
    for column in (
        "address",
        "kind",
        "pci id",
        "memory",
        "numa",
        "iommu group",
        "driver",
        "nvlink domain",
        "uuid",
        "mig",
        "vfio",
    ):
        table.add_column(column)
    for gpu in gpus:
        mig = (
            gpu.mig_mode
            if gpu.mig_mode_pending is None
            else (f"{gpu.mig_mode} (pending {gpu.mig_mode_pending})")
        )
        if gpu.mig_instances:
            mig += f", {len(gpu.mig_instances)} instances"
        table.add_row(
            gpu.bdf,
            Text(gpu.kind.name, style="" if gpu.kind.known else "yellow"),
            gpu.pci.pci_id,
            _memory(gpu),
            "-" if gpu.numa_node is None else str(gpu.numa_node),
            "-" if gpu.iommu_group is None else str(gpu.iommu_group),
            gpu.driver or "-",
            gpu.nvlink_domain or "-",
            gpu.uuid or "-",
            mig,
            _yes_no(gpu.available, "ready", "unavailable"),
        )
    return table


def _unavailable_lines(gpus: list[Gpu]) -> list[Text]:
    lines = []
    for gpu in gpus:
        for reason in gpu.unavailable_reasons:
            line = Text(f"{gpu.bdf} unavailable: ", style="bold red")
            line.append(reason, style="")
            lines.append(line)
    return lines


def _shared_groups(gpus: list[Gpu]) -> list[Table]:
    tables = []
    for gpu in gpus:
        if len(gpu.group_members) < 2:
            continue
        table = Table(title=f"IOMMU group {gpu.iommu_group} of {gpu.bdf}", show_header=True)
        for column in ("address", "function", "driver", "role"):
            table.add_column(column)
        for member in gpu.group_members:
            table.add_row(
                member.bdf,
                f"{member.class_name} {member.pci_id}",
                member.driver or "-",
                Text(member.role, style="red" if member.role == "foreign" else ""),
            )
        tables.append(table)
    return tables


def _nvswitch_table(inventory: HostInventory) -> Table:
    table = Table(title="NVSwitches (NVLink fabric, not offered as GPUs)", show_header=True)
    for column in ("address", "name", "pci id", "numa", "driver"):
        table.add_column(column)
    for switch in inventory.nvswitches:
        table.add_row(
            switch.bdf,
            switch.name,
            switch.pci_id,
            "-" if switch.numa_node is None else str(switch.numa_node),
            switch.driver or "-",
        )
    return table


def _mig_table(gpus: list[Gpu]) -> Table:
    table = Table(title="MIG instances (sandbox tier, not VFIO)", show_header=True)
    for column in ("gpu", "uuid", "profile", "gpu instance", "compute instance", "memory"):
        table.add_column(column)
    for gpu in gpus:
        for instance in gpu.mig_instances:
            memory = instance.memory_total_bytes
            table.add_row(
                gpu.bdf,
                instance.uuid,
                instance.profile or "-",
                "-" if instance.gpu_instance_id is None else str(instance.gpu_instance_id),
                "-" if instance.compute_instance_id is None else str(instance.compute_instance_id),
                "-" if memory is None else f"{memory / _GIB:.1f} GiB",
            )
    return table
