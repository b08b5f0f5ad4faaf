"""Capacity questions and GPU admission, answered by the scheduler's policy over this host."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from hangar.agent.gpus import HostGpus
from hangar.agent.placement import HostPlacement
from hangar.api.services.platform import PlacementsRequest, PlatformService
from hangar.devices import NoNvml, SysfsRoot
from hangar.errors import InsufficientCapacity, Unprocessable
from hangar.images.driver_bundle import DRIVER_BUNDLE_SETTING
from hangar.model.config import GuestConfig, MachineConfig
from hangar.model.gpu import GpuState
from hangar.model.host import HostInfo
from hangar.store.embedded import open_embedded_stores
from tests.devices.sysfs_fixture import build_hgx_h100
from tests.fixtures.driver_bundle import write_bundle

H100 = {"cpu_kind": "performance", "gpu_kind": "h100-sxm"}


def test_placements_and_regions_over_http(api: httpx.Client) -> None:
    body = {"guest": {"cpus": 1, "memory_mb": 256}, "count": 3}
    response = api.post("/v1/platform/placements", json=body)
    assert response.status_code == 200, response.text
    [region] = response.json()["regions"]
    assert region == {"region": "local", "requested": 3, "placeable": 3}
    gpu = {"guest": {**H100, "gpus": 1}, "count": 1}
    [gpu_region] = api.post("/v1/platform/placements", json=gpu).json()["regions"]
    assert gpu_region["placeable"] == 0, "this test host has no GPUs"
    regions = api.get("/v1/platform/regions", params={"gpu_kind": "h100-sxm"}).json()
    assert regions == {"regions": [{"code": "local", "gpu_kinds": [], "capacity": 0}]}
    bad = api.post("/v1/platform/placements", json={"count": 0})
    assert bad.status_code == 422 and "count" in bad.json()["error"]


HGX = HostInfo(id="hgx-1", region="ord", cpus=64, memory_mb=512 * 1024)


@pytest.fixture
def gpu_platform(tmp_path: Path) -> tuple[HostPlacement, PlatformService]:
    """An HGX host registered as its agent registers it; the platform answers from the same
    claim store the agent claims on."""
    stores = open_embedded_stores(tmp_path / "db")
    builder = build_hgx_h100(tmp_path / "sys")
    HostGpus("hgx-1", SysfsRoot(builder.root), NoNvml("tests")).register(stores.gpus)
    placement = HostPlacement(stores.claims, HGX)
    placement.register(stores.gpus.list_gpus())
    bundle = write_bundle(tmp_path / "bundle", {"nvidia": b"module"})
    return placement, PlatformService(stores.claims, bundle)


def gpu_config(gpus: int) -> MachineConfig:
    return MachineConfig.model_validate({"image": "x", "guest": {**H100, "gpus": gpus}})


def test_gpu_admission_follows_what_is_free(
    gpu_platform: tuple[HostPlacement, PlatformService],
) -> None:
    placement, platform = gpu_platform
    platform.admit_gpu_machine(gpu_config(8), "ord")
    for n in range(7):
        placement.place(f"m-busy-{n}", gpu_config(1).guest)
    # Claims of machines that are not running still take GPUs out of the free pool.
    platform.admit_gpu_machine(gpu_config(1), "ord")
    with pytest.raises(InsufficientCapacity) as refused:
        platform.admit_gpu_machine(gpu_config(2), "ord")
    assert "ord" in refused.value.message and "h100-sxm" in refused.value.message
    [last] = [gpu for gpu in placement.gpus() if gpu.state == GpuState.FREE]
    placement.set_gpu_state(last.bdf, GpuState.QUARANTINED, GpuState.FREE)
    with pytest.raises(InsufficientCapacity):
        platform.admit_gpu_machine(gpu_config(1), "ord")


def test_gpu_machines_need_a_driver_bundle(tmp_path: Path) -> None:
    stores = open_embedded_stores(tmp_path / "db")
    with pytest.raises(Unprocessable) as refused:
        PlatformService(stores.claims, None).admit_gpu_machine(gpu_config(1), "ord")
    assert DRIVER_BUNDLE_SETTING in refused.value.message


def test_dry_run_counts_whole_gpus_per_region(
    gpu_platform: tuple[HostPlacement, PlatformService],
) -> None:
    _, platform = gpu_platform
    view = platform.placements(
        PlacementsRequest(guest=GuestConfig.model_validate({**H100, "gpus": 2}), count=6)
    )
    assert [(r.region, r.requested, r.placeable) for r in view.regions] == [("ord", 6, 4)]
    assert platform.regions("h100-sxm").regions[0].capacity == 8
