"""The SQLite claim store's record format. The claim protocol itself (compare-and-set, racing
schedulers on separate connections) is tested on every store in ``test_claim_contract``."""

from __future__ import annotations

from hangar.model.gpu import GpuState
from hangar.scheduler import Claim
from hangar.store.host_claims import host_state_from_json, host_state_to_json
from tests.scheduler.fleet import gpu_host


def test_host_state_round_trips_through_json() -> None:
    host = gpu_host("gpu-1", gpus=2).with_claim(Claim("m1", 1000, 512, (1,), 1000))
    host = host.with_gpu_state(0, GpuState.QUARANTINED)
    assert host_state_from_json(host_state_to_json(host)) == host
