from __future__ import annotations

import pytest

from hangar.model.gpu_kinds import (
    GPU_KINDS,
    gpu_kind_for_device_id,
    gpu_kind_named,
    nvswitch_name,
    unknown_gpu_kind,
)


@pytest.mark.parametrize(
    ("device_id", "name", "form_factor", "mig"),
    [
        (0x2236, "a10", "pcie", False),
        (0x26B9, "l40s", "pcie", False),
        (0x20B1, "a100-pcie-40gb", "pcie", True),
        (0x20F1, "a100-pcie-40gb", "pcie", True),
        (0x20B5, "a100-pcie-80gb", "pcie", True),
        (0x20B0, "a100-sxm4-40gb", "sxm", True),
        (0x20B2, "a100-sxm4-80gb", "sxm", True),
        (0x2331, "h100-pcie", "pcie", True),
        (0x2330, "h100-sxm", "sxm", True),
        (0x2321, "h100-nvl", "pcie", True),
        (0x2335, "h200", "sxm", True),
        (0x233B, "h200-nvl", "pcie", True),
    ],
)
def test_catalog_maps_pci_ids_to_kinds(
    device_id: int, name: str, form_factor: str, mig: bool
) -> None:
    kind = gpu_kind_for_device_id(device_id)

    assert kind is not None
    assert (kind.name, kind.form_factor, kind.mig_capable) == (name, form_factor, mig)
    assert f"10de:{device_id:04x}" in kind.pci_ids
    assert gpu_kind_named(name) == kind


def test_every_kind_has_memory_and_a_unique_name_and_ids() -> None:
    names = [kind.name for kind in GPU_KINDS]
    ids = [device_id for kind in GPU_KINDS for device_id in kind.pci_device_ids]

    assert len(names) == len(set(names))
    assert len(ids) == len(set(ids))
    assert all(kind.memory_gb and kind.known for kind in GPU_KINDS)
    assert {kind.nvlink for kind in GPU_KINDS if kind.form_factor == "sxm"} == {"baseboard"}


@pytest.mark.parametrize(
    ("device_id", "name"), [(0x1AF1, "nvswitch-gen2"), (0x22A3, "nvswitch-gen3")]
)
def test_nvswitches_are_recognised_and_never_gpu_kinds(device_id: int, name: str) -> None:
    assert nvswitch_name(device_id) == name
    assert gpu_kind_for_device_id(device_id) is None


def test_unknown_gpu_gets_a_kind_named_after_its_id() -> None:
    assert gpu_kind_for_device_id(0x2684) is None
    kind = unknown_gpu_kind(0x2684)

    assert kind.name == "unknown-10de:2684"
    assert not kind.known
    assert kind.memory_gb is None
    assert kind.form_factor == "unknown"
