from __future__ import annotations

import pytest

from hangar.devices.sysfs import SysfsRoot
from hangar.devices.vfio import FunctionBinding, GroupBinding, bind_group_to_vfio, release_group
from hangar.errors import DeviceError
from tests.devices.kernel_sim import KernelSimulator
from tests.devices.sysfs_fixture import (
    A10_AUDIO,
    A10_GPU,
    NO_IOMMU_GPU,
    SHARED_GPU,
    SysfsBuilder,
)


def _kernel(builder: SysfsBuilder) -> tuple[SysfsRoot, KernelSimulator]:
    kernel = KernelSimulator(builder)
    return SysfsRoot(builder.root, writer=kernel), kernel


def _override(sysfs: SysfsRoot, bdf: str) -> str | None:
    return sysfs.read_text(f"bus/pci/devices/{bdf}/driver_override")


def _driver(sysfs: SysfsRoot, bdf: str) -> str | None:
    return sysfs.link_name(f"bus/pci/devices/{bdf}/driver")


def test_binds_the_gpu_and_its_audio_function_through_driver_override(a10: SysfsBuilder) -> None:
    sysfs, kernel = _kernel(a10)

    binding = bind_group_to_vfio(sysfs, A10_GPU)

    assert binding.changed and binding.iommu_group == 30
    assert binding.functions == [
        FunctionBinding(bdf=A10_GPU, original_driver="nvidia"),
        FunctionBinding(bdf=A10_AUDIO, original_driver="snd_hda_intel"),
    ]
    assert kernel.writes == [
        (f"bus/pci/devices/{A10_GPU}/driver_override", "vfio-pci"),
        ("bus/pci/drivers/nvidia/unbind", A10_GPU),
        ("bus/pci/drivers_probe", A10_GPU),
        (f"bus/pci/devices/{A10_AUDIO}/driver_override", "vfio-pci"),
        ("bus/pci/drivers/snd_hda_intel/unbind", A10_AUDIO),
        ("bus/pci/drivers_probe", A10_AUDIO),
    ]
    for bdf in (A10_GPU, A10_AUDIO):
        assert _override(sysfs, bdf) == "vfio-pci"
        assert _driver(sysfs, bdf) == "vfio-pci"
    assert sysfs.exists(f"bus/pci/drivers/vfio-pci/{A10_GPU}")


def test_binding_a_bound_group_writes_nothing(a10: SysfsBuilder) -> None:
    sysfs, kernel = _kernel(a10)
    first = bind_group_to_vfio(sysfs, A10_GPU)
    kernel.writes.clear()

    again = bind_group_to_vfio(sysfs, A10_GPU, previous=first)

    assert kernel.writes == []
    assert not again.changed
    assert again.functions == first.functions


def test_release_returns_each_function_to_its_original_driver(a10: SysfsBuilder) -> None:
    sysfs, kernel = _kernel(a10)
    binding = bind_group_to_vfio(sysfs, A10_GPU)
    kernel.writes.clear()

    released = release_group(sysfs, binding)

    assert released.changed
    assert [(f.bdf, f.driver_before, f.driver_after) for f in released.functions] == [
        (A10_GPU, "vfio-pci", "nvidia"),
        (A10_AUDIO, "vfio-pci", "snd_hda_intel"),
    ]
    assert kernel.writes == [
        (f"bus/pci/devices/{A10_GPU}/driver_override", "\n"),
        ("bus/pci/drivers/vfio-pci/unbind", A10_GPU),
        ("bus/pci/drivers_probe", A10_GPU),
        (f"bus/pci/devices/{A10_AUDIO}/driver_override", "\n"),
        ("bus/pci/drivers/vfio-pci/unbind", A10_AUDIO),
        ("bus/pci/drivers_probe", A10_AUDIO),
    ]
    assert _override(sysfs, A10_GPU) == "(null)"


def test_releasing_a_released_group_writes_nothing(a10: SysfsBuilder) -> None:
    sysfs, kernel = _kernel(a10)
    binding = bind_group_to_vfio(sysfs, A10_GPU)
    release_group(sysfs, binding)
    kernel.writes.clear()

    again = release_group(sysfs, binding)

    assert kernel.writes == []
    assert not again.changed


def test_a_group_holding_a_nic_is_refused_before_any_write(
    shared_with_nic: SysfsBuilder,
) -> None:
    sysfs, kernel = _kernel(shared_with_nic)

    with pytest.raises(DeviceError) as raised:
        bind_group_to_vfio(sysfs, SHARED_GPU)

    assert raised.value.fields["foreign"] == ["0000:05:00.0"]
    assert raised.value.fields["iommu_group"] == 15
    assert kernel.writes == []
    assert _driver(sysfs, SHARED_GPU) == "nvidia"


def test_a_gpu_without_iommu_group_is_refused(no_iommu: SysfsBuilder) -> None:
    sysfs, kernel = _kernel(no_iommu)

    with pytest.raises(DeviceError, match="no IOMMU group"):
        bind_group_to_vfio(sysfs, NO_IOMMU_GPU)
    assert kernel.writes == []


def test_bind_refuses_when_vfio_pci_is_not_loaded(a10: SysfsBuilder) -> None:
    (a10.root / "bus/pci/drivers/vfio-pci").rename(a10.root / "vfio-pci-unloaded")
    sysfs, kernel = _kernel(a10)

    with pytest.raises(DeviceError, match="vfio-pci is not loaded"):
        bind_group_to_vfio(sysfs, A10_GPU)
    assert kernel.writes == []


def test_a_function_that_does_not_bind_fails_with_the_record_to_resume_from(
    a10: SysfsBuilder,
) -> None:
    sysfs, kernel = _kernel(a10)
    kernel.unprobeable.add(A10_AUDIO)

    with pytest.raises(DeviceError) as raised:
        bind_group_to_vfio(sysfs, A10_GPU)

    assert raised.value.fields["bdf"] == A10_AUDIO
    assert raised.value.message.endswith("it is bound to no driver")
    partial = GroupBinding.model_validate(raised.value.fields["binding"])
    assert [(f.bdf, f.original_driver) for f in partial.functions] == [
        (A10_GPU, "nvidia"),
        (A10_AUDIO, "snd_hda_intel"),
    ]

    # The durable step retries with the record: originals survive though the GPU moved.
    kernel.unprobeable.clear()
    resumed = bind_group_to_vfio(sysfs, A10_GPU, previous=partial)
    assert resumed.functions == partial.functions
    assert _driver(sysfs, A10_AUDIO) == "vfio-pci"
    release_group(sysfs, resumed)
    assert (_driver(sysfs, A10_GPU), _driver(sysfs, A10_AUDIO)) == ("nvidia", "snd_hda_intel")


def test_without_a_record_a_bound_function_is_released_to_the_kernels_choice(
    a10: SysfsBuilder,
) -> None:
    sysfs, _ = _kernel(a10)
    bind_group_to_vfio(sysfs, A10_GPU)

    forgotten = bind_group_to_vfio(sysfs, A10_GPU)  # a crash lost the first record

    assert {(f.original_driver, f.original_known) for f in forgotten.functions} == {(None, False)}
    release_group(sysfs, forgotten)
    assert (_driver(sysfs, A10_GPU), _driver(sysfs, A10_AUDIO)) == ("nvidia", "snd_hda_intel")


def test_release_fails_when_the_original_driver_does_not_return(a10: SysfsBuilder) -> None:
    sysfs, kernel = _kernel(a10)
    binding = bind_group_to_vfio(sysfs, A10_GPU)
    del kernel.native_drivers[A10_GPU]  # nvidia.ko unloaded meanwhile

    with pytest.raises(DeviceError) as raised:
        release_group(sysfs, binding)

    assert raised.value.fields == {
        "bdf": A10_GPU,
        "driver": None,
        "expected_driver": "nvidia",
    }


def test_without_a_kernel_behind_the_tree_bind_reports_the_failed_probe(
    a10: SysfsBuilder,
) -> None:
    sysfs = SysfsRoot(a10.root)  # plain files: writes land, nothing reacts

    with pytest.raises(DeviceError) as raised:
        bind_group_to_vfio(sysfs, A10_GPU)

    assert raised.value.fields["bdf"] == A10_GPU
    assert raised.value.message.endswith("did not bind to vfio-pci: it is bound to nvidia")
    assert _override(sysfs, A10_GPU) == "vfio-pci"
    assert (a10.root / "bus/pci/drivers/nvidia/unbind").read_text() == A10_GPU
    assert (a10.root / "bus/pci/drivers_probe").read_text() == ""
