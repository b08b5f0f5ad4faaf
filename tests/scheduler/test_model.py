from __future__ import annotations

import pytest

from hangar.errors import InvalidRequest
from hangar.model.gpu import GpuState
from hangar.scheduler import Claim, Gpu, HostState, PlacementRequest
from tests.scheduler.fleet import gpu_host


def test_free_resources_are_derived_from_claims() -> None:
    host = gpu_host("h1", gpus=4, cpu=32, memory_gb=64)
    host = host.with_claim(Claim("m1", 8000, 16384, (0, 1), 1000))
    host = host.with_claim(Claim("m2", 2000, 4096, (2,), 250))
    assert host.free_cpu_milli == 22000
    assert host.free_memory_mb == 64 * 1024 - 20480
    assert host.gpu_used_milli == (1000, 1000, 250, 0)
    assert [gpu.state for gpu in host.gpus] == [
        GpuState.CLAIMED,
        GpuState.CLAIMED,
        GpuState.FREE,
        GpuState.FREE,
    ]


@pytest.mark.parametrize(
    "claim",
    [
        Claim("big", 33000, 1024),
        Claim("fat", 1000, 65 * 1024),
        Claim("over", 1000, 1024, (0,), 800),
        Claim("ghost", 1000, 1024, (9,), 1000),
    ],
)
def test_a_host_cannot_be_over_committed(claim: Claim) -> None:
    host = gpu_host("h1", gpus=4, cpu=32, memory_gb=64).with_claim(Claim("m1", 0, 0, (0,), 300))
    with pytest.raises(InvalidRequest):
        host.with_claim(claim)


def test_a_machine_holds_one_claim_per_host() -> None:
    host = gpu_host("h1").with_claim(Claim("m1", 1000, 1024))
    with pytest.raises(InvalidRequest):
        host.with_claim(Claim("m1", 1000, 1024))


def test_release_sends_gpus_nobody_uses_to_cleaning() -> None:
    host = gpu_host("h1", gpus=2)
    host = host.with_claim(Claim("whole", 1000, 1024, (0,), 1000))
    host = host.with_claim(Claim("a", 1000, 1024, (1,), 300))
    host = host.with_claim(Claim("b", 1000, 1024, (1,), 300))
    host = host.without_claim("whole").without_claim("a")
    assert [gpu.state for gpu in host.gpus] == [GpuState.CLEANING, GpuState.FREE]
    assert host.gpu_used_milli == (0, 300)
    host = host.without_claim("b")
    assert [gpu.state for gpu in host.gpus] == [GpuState.CLEANING, GpuState.CLEANING]
    assert host.without_claim("nobody") is host
    assert host.with_gpu_state(0, GpuState.FREE).gpus[0].state is GpuState.FREE


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"cpu_milli": -1}, "cpu_milli"),
        ({"gpus": 1, "gpu_milli": 500}, "gpu_milli"),
        ({"gpu_milli": 1000}, "gpu_milli"),
        ({"gpus": -2}, "gpus"),
        ({"gpus": 1, "gpu_kinds": frozenset()}, "gpu_kinds"),
    ],
)
def test_requests_are_validated(fields: dict[str, object], field: str) -> None:
    arguments: dict[str, object] = {"cpu_milli": 1000, "memory_mb": 1024, **fields}
    with pytest.raises(InvalidRequest) as raised:
        PlacementRequest(**arguments)  # type: ignore[arg-type]
    assert raised.value.fields["field"] == field


def test_gpu_demand_is_in_milli_gpus() -> None:
    assert PlacementRequest(cpu_milli=0, memory_mb=0, gpus=2).gpu_demand_milli == 2000
    assert PlacementRequest(cpu_milli=0, memory_mb=0, gpu_milli=250).gpu_demand_milli == 250
    assert not PlacementRequest(cpu_milli=1000, memory_mb=0).wants_gpu


def test_a_host_carries_one_gpu_kind() -> None:
    host = gpu_host("h1", gpus=2)
    mixed = (host.gpus[0], Gpu(1, "l40s", "0000:02:00.0"))
    with pytest.raises(InvalidRequest):
        HostState(host.id, host.region, host.pool, host.cpu_milli, host.memory_mb, mixed)
