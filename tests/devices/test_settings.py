"""Settings a tenant stages "for the next reset": read at the handoff, put back to the
operator's defaults, verified. The fixture GPUs keep pending modes and apply them on reset."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hangar.devices.settings import (
    AdminToolsSettings,
    NvmlSettings,
    OperatorDefaults,
    read_staged_settings,
    restore_operator_defaults,
    verify_settings,
)
from hangar.devices.sysfs import SysfsRoot
from hangar.devices.vfio import bind_group_to_vfio
from hangar.devices.worker import InlineRunner, WorkerRunner
from hangar.errors import DeviceError
from tests.conftest import REPO_ROOT
from tests.devices.gpu_hw import SYSFS_ENV, Hardware
from tests.devices.kernel_sim import KernelSimulator
from tests.devices.sysfs_fixture import HGX_H100_GPUS, SysfsBuilder

GPU = next(iter(HGX_H100_GPUS))
FAKE_NVML = "tests.devices.gpu_hw"
FAKE_TOOLS = [sys.executable, str(Path(__file__).with_name("fake_gpu_tools.py"))]
DEFAULTS = OperatorDefaults()


@pytest.fixture
def host(hgx: SysfsBuilder, monkeypatch: pytest.MonkeyPatch) -> Hardware:
    monkeypatch.setenv(SYSFS_ENV, str(hgx.root))
    assert hgx.host is not None
    return Hardware(hgx.host)


def _tenant_staged(hardware: Hardware) -> None:
    """What a tenant can do from inside its VM with nvidia-smi: ECC off and MIG on, pending."""
    with hardware.edit(GPU) as gpu:
        gpu.ecc = ["enabled", "disabled"]
        gpu.mig = ["disabled", "enabled"]


def test_a_clean_gpu_is_at_the_defaults(host: Hardware) -> None:
    staged = read_staged_settings([NvmlSettings(InlineRunner(), module=FAKE_NVML)], GPU, "nvidia")

    assert [(s.name, s.current, s.pending) for s in staged.settings] == [
        ("ecc", "enabled", "enabled"),
        ("mig", "disabled", "disabled"),
    ]
    assert staged.mismatches(DEFAULTS) == [] and not staged.needs_reset(DEFAULTS)
    verify_settings(staged, DEFAULTS)


def test_changes_a_tenant_staged_are_found_and_staged_back(host: Hardware) -> None:
    _tenant_staged(host)
    source = NvmlSettings(InlineRunner(), module=FAKE_NVML)

    staged = read_staged_settings([source], GPU, "nvidia")
    changed = restore_operator_defaults([source], staged, DEFAULTS)
    after = read_staged_settings([source], GPU, "nvidia")

    assert staged.mismatches(DEFAULTS) == [
        "ecc: current enabled, pending disabled, default enabled",
        "mig: current disabled, pending enabled, default disabled",
    ]
    assert changed == ["ecc", "mig"]
    assert after.mismatches(DEFAULTS) == []
    assert host.gpu(GPU).ecc == ["enabled", "enabled"]


def test_a_change_already_applied_needs_a_reset_and_fails_verification_until_then(
    host: Hardware,
) -> None:
    """vfio-pci's FLR at QEMU close already applied what the tenant staged."""
    _tenant_staged(host)
    host.apply_reset(GPU, bus=False)
    source = NvmlSettings(InlineRunner(), module=FAKE_NVML)

    staged = read_staged_settings([source], GPU, "nvidia")
    restore_operator_defaults([source], staged, DEFAULTS)
    before_reset = read_staged_settings([source], GPU, "nvidia")
    host.apply_reset(GPU, bus=True)
    after_reset = read_staged_settings([source], GPU, "nvidia")

    assert staged.needs_reset(DEFAULTS)
    with pytest.raises(DeviceError) as raised:
        verify_settings(before_reset, DEFAULTS)
    assert raised.value.fields["reason"] == "settings_mismatch"
    assert raised.value.fields["mismatches"] == [
        "ecc: current disabled, pending enabled, default enabled",
        "mig: current enabled, pending disabled, default disabled",
    ]
    verify_settings(after_reset, DEFAULTS)


def test_nvml_settings_are_read_in_a_killable_worker(host: Hardware) -> None:
    _tenant_staged(host)
    source = NvmlSettings(WorkerRunner(python_path=[REPO_ROOT]), module=FAKE_NVML)

    staged = read_staged_settings([source], GPU, "nvidia")
    restore_operator_defaults([source], staged, DEFAULTS)

    assert staged.get("ecc") is not None
    assert host.gpu(GPU).ecc == ["enabled", "enabled"]
    assert host.gpu(GPU).mig == ["disabled", "disabled"]


def test_nvml_cannot_read_a_gpu_off_the_nvidia_driver(host: Hardware, hgx: SysfsBuilder) -> None:
    bind_group_to_vfio(SysfsRoot(hgx.root, writer=KernelSimulator(hgx)), GPU)

    with pytest.raises(DeviceError) as raised:
        NvmlSettings(InlineRunner(), module=FAKE_NVML).read(GPU)

    assert raised.value.fields["reason"] == "nvml_no_gpu"


def test_cc_and_ppcie_are_read_and_staged_through_gpu_admin_tools_on_vfio(
    host: Hardware, hgx: SysfsBuilder
) -> None:
    bind_group_to_vfio(SysfsRoot(hgx.root, writer=KernelSimulator(hgx)), GPU)
    with host.edit(GPU) as gpu:
        gpu.cc = ["off", "devtools"]  # a tenant cannot do this itself; a host tool could
        gpu.ppcie = ["on", "on"]
    source = AdminToolsSettings(FAKE_TOOLS)

    staged = read_staged_settings([source], GPU, "vfio-pci")
    changed = restore_operator_defaults([source], staged, DEFAULTS)

    assert [(s.name, s.current, s.pending) for s in staged.settings] == [
        ("cc", "off", "devtools"),
        ("ppcie", "on", "on"),
    ]
    assert changed == ["cc", "ppcie"]
    assert host.gpu(GPU).cc == ["off", "off"] and host.gpu(GPU).ppcie == ["on", "off"]
    assert read_staged_settings([source], GPU, "vfio-pci").needs_reset(DEFAULTS)


def test_sources_only_read_where_the_gpu_is_bound_for_them(host: Hardware) -> None:
    sources = [NvmlSettings(InlineRunner(), module=FAKE_NVML), AdminToolsSettings(FAKE_TOOLS)]

    on_nvidia = read_staged_settings(sources, GPU, "nvidia")

    assert [s.name for s in on_nvidia.settings] == ["ecc", "mig"]


def test_gpu_admin_tools_failing_is_a_device_error(host: Hardware) -> None:
    """On nvidia the tool refuses; the handoff must not read it there."""
    with pytest.raises(DeviceError) as raised:
        AdminToolsSettings(FAKE_TOOLS).read(GPU)

    assert raised.value.fields["reason"] == "settings_unreadable"
    assert "nvidia driver loaded" in raised.value.message
