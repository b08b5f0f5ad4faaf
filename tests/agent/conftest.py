"""Fixtures of the GPU host tests (tests/agent/gpu_fixture.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hangar.images.initramfs import module_bytes, resolve_modules
from hangar.images.kernel import ensure_kernel
from hangar.vmm.qemu import QemuDriver
from tests.agent.gpu_fixture import KVM_HOST, GpuHost, fixture_host
from tests.agent.vmm_stand_in import SleepingVmmPlatform
from tests.conftest import SUITE_CACHE
from tests.devices.sysfs_fixture import build_hgx_h100
from tests.devices.test_fabric import write_fmpm
from tests.fixtures.driver_bundle import write_bundle


@pytest.fixture
def gpu_host(tmp_path: Path, test_image: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[GpuHost]:
    """An HGX H100 host (eight GPUs, each its own IOMMU group, NVSwitches and Fabric
    Manager), with its GPUs' NVML and gpu-admin-tools stand-ins."""
    builder = build_hgx_h100(tmp_path / "sys")
    with fixture_host(tmp_path, builder, test_image, monkeypatch, write_fmpm(tmp_path)) as host:
        yield host


@pytest.fixture(scope="module")
def driver_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A driver bundle for the real guest kernel (its "driver" is the kernel's dummy module)."""
    guest_kernel = ensure_kernel(SUITE_CACHE)
    [module] = resolve_modules(guest_kernel.modules_dir, ["dummy"])
    return write_bundle(
        tmp_path_factory.mktemp("bundle") / "driver",
        {"dummy": module_bytes(guest_kernel.modules_dir / module)},
        kernel_version=guest_kernel.version,
    )


@pytest.fixture
def sleeping_platform(driver_bundle: Path) -> Callable[[], SleepingVmmPlatform]:
    return lambda: SleepingVmmPlatform(
        SUITE_CACHE, QemuDriver(accel=KVM_HOST), driver_bundle=driver_bundle
    )
