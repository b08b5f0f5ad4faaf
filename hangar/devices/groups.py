"""GPU groups: the unit hangar claims, binds, resets and releases.

VFIO hands a whole IOMMU group to one guest, and a reset or a bind acts on every function
of it; so two GPUs in one group (behind a switch without ACS) must go to the same tenant,
or one tenant's handoff resets the other's GPU. A :class:`GpuGroup` is one IOMMU group that
holds NVIDIA GPUs: its GPUs, their companion functions (HD audio, USB-C), where it sits
(NUMA node, parent port) and whether each member can be reset between tenants.

Reset rules, per member (``reset_method``, as the kernel lists it):

- ``flr`` or ``pm`` resets one function;
- ``bus`` is a secondary bus reset of the parent port, which the kernel refuses for a
  function that shares its bus (any multi-function slot): such a member needs the parent
  port's ``reset_subordinate`` (Linux 6.14), which resets the whole slot at once;
- HD-audio companions often list nothing usable at all.

:func:`plan_group_claim` picks whole groups whose GPUs add up to a request.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

from pydantic import BaseModel, ConfigDict, computed_field

from hangar.devices.iommu import GroupMember, group_problem, read_group_members
from hangar.devices.pci import (
    NVIDIA_VENDOR_ID,
    PCI_DEVICES,
    PciDevice,
    device_attr,
    read_pci_device,
)
from hangar.devices.sysfs import SysfsRoot
from hangar.errors import DeviceError
from hangar.model.gpu_kinds import GpuKind, gpu_kind_for_device_id, unknown_gpu_kind

RESET_SUBORDINATE = "reset_subordinate"
FUNCTION_RESETS = ("flr", "pm")


class GroupFunction(BaseModel):
    """A function of a GPU group that passes through (a GPU or a companion)."""

    model_config = ConfigDict(frozen=True)

    bdf: str
    role: str
    """``gpu`` or ``companion``."""
    pci_id: str
    driver: str | None
    reset_methods: list[str] | None
    slot_functions: int
    """Functions present in this function's slot (1: a single-function device)."""
    prefetchable_bar_bytes: int
    """Sum of the 64-bit prefetchable BARs (the framebuffer aperture lives there)."""
    bar_bytes: list[int]
    """Every 64-bit memory BAR's size, for sizing the guest's PCI hole."""

    @property
    def slot(self) -> str:
        return self.bdf.rsplit(".", 1)[0]

    @property
    def function(self) -> int:
        return int(self.bdf.rsplit(".", 1)[1])


class GpuGroup(BaseModel):
    """One IOMMU group holding NVIDIA GPUs, as the claim, bind, reset and release unit."""

    iommu_group: int
    gpus: list[str]
    kinds: list[str]
    """The kind of each GPU, in ``gpus`` order."""
    functions: list[GroupFunction]
    """GPUs and companions, by address; bridges stay with the host and are not listed."""
    numa_node: int | None
    bridges: list[str] = []
    """Bridges in the same IOMMU group (a switch without ACS): they stay on the host."""
    parent_port: str | None
    """The lowest bridge above all of the group's functions: where a bus reset acts."""
    parent_port_can_reset_subordinate: bool
    problems: list[str]
    """Why the group cannot go to a tenant; empty when it can."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def usable(self) -> bool:
        return not self.problems

    @property
    def bdfs(self) -> list[str]:
        return [function.bdf for function in self.functions]

    @property
    def gpu_count(self) -> int:
        return len(self.gpus)

    def companions_of(self, gpu_bdf: str) -> list[str]:
        slot = gpu_bdf.rsplit(".", 1)[0]
        return [f.bdf for f in self.functions if f.slot == slot and f.bdf != gpu_bdf]


def parent_port(sysfs: SysfsRoot, bdf: str) -> str | None:
    """The bridge directly above ``bdf`` (its sysfs parent folder), or None at a root bus."""
    return common_port(sysfs, [bdf])


def common_port(sysfs: SysfsRoot, bdfs: Sequence[str]) -> str | None:
    """The lowest bridge above every function of ``bdfs``, or None (a root bus)."""
    paths = [sysfs.real_relpath(f"{PCI_DEVICES}/{bdf}").split("/")[:-1] for bdf in bdfs]
    common: list[str] = []
    for parts in zip(*paths, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    for name in reversed(common):
        if sysfs.exists(f"{PCI_DEVICES}/{name}"):
            return name
    return None


def functions_below(sysfs: SysfsRoot, bridge: str) -> list[str]:
    """Every PCI function below ``bridge`` (what its secondary bus reset touches)."""
    real = sysfs.real_relpath(f"{PCI_DEVICES}/{bridge}") + "/"
    below = []
    for bdf in sysfs.list_dir(PCI_DEVICES):
        if bdf != bridge and sysfs.real_relpath(f"{PCI_DEVICES}/{bdf}").startswith(real):
            below.append(bdf)
    return below


def member_reset_problem(
    function: GroupFunction, can_reset_subordinate: bool, sole_on_bus: bool
) -> str | None:
    """Why this member cannot be reset between tenants, or None."""
    methods = function.reset_methods
    if methods is None:
        return "the kernel exposes no reset_method for it"
    if any(method in FUNCTION_RESETS for method in methods):
        return None
    if can_reset_subordinate:
        return None
    if "bus" in methods and sole_on_bus:
        return None
    listed = " ".join(methods) or "nothing"
    if "bus" in methods:
        return (
            f"only a bus reset (reset_method lists {listed}), which the kernel refuses for a "
            "function sharing its bus, and the parent port has no reset_subordinate"
        )
    return f"no FLR, PM or bus reset (reset_method lists {listed})"


def read_gpu_group(sysfs: SysfsRoot, group: int) -> GpuGroup:
    """The group as a claim unit; DeviceError when it holds no NVIDIA GPU."""
    members = read_group_members(sysfs, group)
    gpus = [m.bdf for m in members if m.role == "gpu"]
    if not gpus:
        raise DeviceError(f"IOMMU group {group} holds no NVIDIA GPU", iommu_group=group)
    devices = {m.bdf: read_pci_device(sysfs, m.bdf) for m in members if m.passes_through}
    all_bdfs = set(sysfs.list_dir(PCI_DEVICES))
    functions = [
        _function(member, devices[member.bdf], all_bdfs)
        for member in members
        if member.passes_through
    ]
    port = common_port(sysfs, [f.bdf for f in functions])
    can_reset_subordinate = port is not None and sysfs.exists(device_attr(port, RESET_SUBORDINATE))
    problems = _problems(sysfs, group, members, functions, can_reset_subordinate)
    nodes = {devices[bdf].numa_node for bdf in gpus}
    return GpuGroup(
        iommu_group=group,
        gpus=gpus,
        kinds=[_kind(devices[bdf]).name for bdf in gpus],
        functions=functions,
        numa_node=nodes.pop() if len(nodes) == 1 else None,
        bridges=[m.bdf for m in members if m.role == "bridge"],
        parent_port=port,
        parent_port_can_reset_subordinate=can_reset_subordinate,
        problems=problems,
    )


def read_gpu_groups(sysfs: SysfsRoot) -> list[GpuGroup]:
    """Every IOMMU group that holds an NVIDIA GPU, by group number."""
    groups: set[int] = set()
    for bdf in sysfs.list_dir(PCI_DEVICES):
        try:
            device = read_pci_device(sysfs, bdf)
        except DeviceError:
            continue
        if device.iommu_group is not None and _is_gpu(device):
            groups.add(device.iommu_group)
    return [read_gpu_group(sysfs, group) for group in sorted(groups)]


def group_of(sysfs: SysfsRoot, gpu_bdf: str) -> GpuGroup:
    device = read_pci_device(sysfs, gpu_bdf)
    if device.iommu_group is None:
        raise DeviceError(
            f"{gpu_bdf} has no IOMMU group: the IOMMU is off, VFIO cannot pass it through",
            bdf=gpu_bdf,
        )
    return read_gpu_group(sysfs, device.iommu_group)


def plan_group_claim(
    groups: Sequence[GpuGroup],
    count: int,
    *,
    kind: str | None = None,
    nvlink_domains: dict[str, str | None] | None = None,
) -> list[GpuGroup] | None:
    """Whole groups whose GPUs add up to exactly ``count``, or None.

    ``groups`` are the free, usable ones. Preference, deterministic for retries: fewest
    NVLink domains (``nvlink_domains`` maps GPU address to domain), then fewest NUMA
    nodes, then fewest groups, then lowest addresses. A group is never split.
    """
    candidates = [g for g in groups if g.usable and (kind is None or set(g.kinds) == {kind})]
    candidates.sort(key=lambda g: g.gpus[0])
    domains = nvlink_domains or {}
    best: tuple[tuple[int, int, int, list[str]], list[GpuGroup]] | None = None
    for size in range(1, min(count, len(candidates)) + 1):
        for chosen in itertools.combinations(candidates, size):
            if sum(g.gpu_count for g in chosen) != count:
                continue
            key = (
                len({domains.get(bdf) for g in chosen for bdf in g.gpus}),
                len({g.numa_node for g in chosen}),
                size,
                [g.gpus[0] for g in chosen],
            )
            if best is None or key < best[0]:
                best = (key, list(chosen))
        if best is not None and best[0][0] == 1 and best[0][1] == 1:
            break  # larger combinations only add groups
    return None if best is None else best[1]


def _is_gpu(device: PciDevice) -> bool:
    return device.vendor_id == NVIDIA_VENDOR_ID and device.is_display


def _kind(device: PciDevice) -> GpuKind:
    return gpu_kind_for_device_id(device.device_id) or unknown_gpu_kind(device.device_id)


def _function(member: GroupMember, device: PciDevice, all_bdfs: set[str]) -> GroupFunction:
    slot = device.slot
    bars64 = [bar for bar in device.bars if bar.is_64bit and not bar.is_io and not bar.is_rom]
    return GroupFunction(
        bdf=device.bdf,
        role=member.role,
        pci_id=device.pci_id,
        driver=device.driver,
        reset_methods=device.reset_methods,
        slot_functions=sum(1 for bdf in all_bdfs if bdf.rsplit(".", 1)[0] == slot),
        prefetchable_bar_bytes=sum(bar.size for bar in bars64 if bar.prefetchable),
        bar_bytes=[bar.size for bar in bars64],
    )


def _problems(
    sysfs: SysfsRoot,
    group: int,
    members: Iterable[GroupMember],
    functions: Sequence[GroupFunction],
    can_reset_subordinate: bool,
) -> list[str]:
    problems = []
    foreign = group_problem(group, list(members))
    if foreign is not None:
        problems.append(foreign)
    for function in functions:
        port = parent_port(sysfs, function.bdf)
        sole = port is not None and functions_below(sysfs, port) == [function.bdf]
        problem = member_reset_problem(function, can_reset_subordinate, sole)
        if problem is not None:
            problems.append(f"{function.bdf} ({function.role}) cannot be reset: {problem}")
    return problems
