"""GPU groups as claim units: every member's reset method, companions, two GPUs in one
group, and whole-group claim planning."""

from __future__ import annotations

from pathlib import Path

from hangar.devices.groups import group_of, plan_group_claim, read_gpu_groups
from hangar.devices.sysfs import SysfsRoot
from tests.devices.sysfs_fixture import (
    A10_AUDIO,
    A10_GPU,
    HGX_H100_GPUS,
    TWIN_GPUS,
    TWIN_GROUP,
    SysfsBuilder,
    build_a10_with_audio,
    build_two_gpus_one_group,
)

GIB = 1024**3


def test_hgx_has_one_group_per_gpu_each_below_its_own_switch_port(hgx: SysfsBuilder) -> None:
    groups = read_gpu_groups(SysfsRoot(hgx.root))

    assert [g.gpus for g in groups] == [[bdf] for bdf in HGX_H100_GPUS]
    assert all(g.usable and g.kinds == ["h100-sxm"] for g in groups)
    first = groups[0]
    assert first.parent_port == "0000:17:00.0"  # the switch downstream port above 18:00.0
    assert first.numa_node == 0
    [function] = first.functions
    assert function.prefetchable_bar_bytes == 128 * GIB + 32 * 1024**2
    assert function.slot_functions == 1


def test_a10_group_carries_its_audio_companion_in_the_same_slot(a10: SysfsBuilder) -> None:
    group = group_of(SysfsRoot(a10.root), A10_GPU)

    assert group.bdfs == [A10_GPU, A10_AUDIO]
    assert [f.role for f in group.functions] == ["gpu", "companion"]
    assert group.companions_of(A10_GPU) == [A10_AUDIO]
    assert all(f.slot_functions == 2 for f in group.functions)
    assert group.usable  # both members list FLR


def test_an_audio_companion_without_flr_blocks_the_group_on_an_older_kernel(
    a10: SysfsBuilder,
) -> None:
    """HD-audio functions often list only a bus reset, which the kernel refuses for a
    function sharing its bus (the GPU is on the same slot)."""
    (a10.root / f"bus/pci/devices/{A10_AUDIO}/reset_method").write_text("bus\n")

    group = group_of(SysfsRoot(a10.root), A10_GPU)

    assert not group.usable
    assert group.problems == [
        f"{A10_AUDIO} (companion) cannot be reset: only a bus reset (reset_method lists bus), "
        "which the kernel refuses for a function sharing its bus, and the parent port has no "
        "reset_subordinate"
    ]


def test_reset_subordinate_on_the_port_makes_that_companion_resettable(tmp_path: Path) -> None:
    builder = build_a10_with_audio(tmp_path / "sys")
    (builder.root / f"bus/pci/devices/{A10_AUDIO}/reset_method").write_text("\n")
    (builder.device_dir("0000:3a:00.0") / "reset_subordinate").touch()

    group = group_of(SysfsRoot(builder.root), A10_GPU)

    assert group.parent_port == "0000:3a:00.0" and group.parent_port_can_reset_subordinate
    assert group.usable


def test_two_gpus_behind_a_switch_without_acs_are_one_claim_unit(tmp_path: Path) -> None:
    builder = build_two_gpus_one_group(tmp_path / "sys")

    [group] = read_gpu_groups(SysfsRoot(builder.root))

    assert group.iommu_group == TWIN_GROUP and group.gpus == TWIN_GPUS
    assert group.bridges == ["0000:41:00.0", "0000:42:08.0", "0000:42:10.0"]
    assert group.parent_port == "0000:41:00.0", "the switch's upstream port holds both"
    assert group.gpu_count == 2


def test_plan_never_splits_a_group_and_keeps_claims_close(
    tmp_path: Path, hgx: SysfsBuilder
) -> None:
    twin = read_gpu_groups(SysfsRoot(build_two_gpus_one_group(tmp_path / "twin" / "sys").root))
    hgx_groups = read_gpu_groups(SysfsRoot(hgx.root))

    assert plan_group_claim(twin, 1) is None, "one GPU of a two-GPU group cannot be claimed"
    assert plan_group_claim(twin, 2) == twin
    four = plan_group_claim(hgx_groups, 4)
    assert four is not None and [g.gpus[0] for g in four] == list(HGX_H100_GPUS)[:4]
    assert {g.numa_node for g in four} == {0}
    free = hgx_groups[1:]  # 18:00.0 taken: node 0 has three left, node 1 four
    four = plan_group_claim(free, 4)
    assert four is not None and {g.numa_node for g in four} == {1}
    assert plan_group_claim(hgx_groups, 4, kind="l40s") is None
