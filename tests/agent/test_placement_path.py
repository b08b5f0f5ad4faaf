"""The code path of a real machine start goes through the scheduler and the claim store:
a claim store that records every call is injected into a real server (in this process), a
real guest boots, and its CPUs and memory were claimed there, and given back at stop."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import pytest

from hangar.scheduler import HostState, VersionedHost
from hangar.store.host_claims import SqliteClaimStore
from tests.agent.helpers import machine_path, run_machine, wait_state
from tests.conftest import kill_vmms_under
from tests.fixtures.inprocess import InProcessServer

pytestmark = pytest.mark.slow

SLEEPER = ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]


class RecordingClaimStore(SqliteClaimStore):
    """The real SQLite claim store, noting each call and the claims each write carries."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.calls: list[tuple[str, str]] = []
        self.written_claims: list[set[str]] = []
        self._guard = threading.Lock()

    def _note(self, name: str, host_id: str = "") -> None:
        with self._guard:
            self.calls.append((name, host_id))

    def snapshot(self) -> Mapping[str, VersionedHost]:
        self._note("snapshot")
        return super().snapshot()

    def read_host(self, host_id: str) -> VersionedHost | None:
        self._note("read_host", host_id)
        return super().read_host(host_id)

    def compare_and_set(self, host_id: str, expected_version: int, new_state: HostState) -> bool:
        self._note("compare_and_set", host_id)
        written = super().compare_and_set(host_id, expected_version, new_state)
        if written:
            with self._guard:
                self.written_claims.append({claim.machine_id for claim in new_state.claims})
        return written


def test_a_real_start_claims_through_the_scheduler_and_the_claim_store(
    tmp_path: Path, test_image: str
) -> None:
    claims = RecordingClaimStore(tmp_path / "claims.db")
    home = tmp_path / "home"
    try:
        with InProcessServer(home, claims=claims) as server, server.client() as api:
            assert api.post("/v1/apps", json={"app_name": "placed"}).status_code == 201
            machine_id = run_machine(api, "placed", test_image, cmd=SLEEPER)
            wait_state(api, "placed", machine_id, "started")
            host_id = server.embedded.host.id
            [record] = claims.snapshot().values()
            [claim] = [c for c in record.state.claims if c.machine_id == machine_id]
            assert claim.cpu_milli == 1000 and claim.memory_mb == 256
            assert any(machine_id in written for written in claims.written_claims)
            assert ("compare_and_set", host_id) in claims.calls
            response = api.post(machine_path("placed", machine_id) + "/stop", json={})
            assert response.status_code == 200
            wait_state(api, "placed", machine_id, "stopped")
            [record] = claims.snapshot().values()
            assert all(c.machine_id != machine_id for c in record.state.claims)
            assert machine_id not in claims.written_claims[-1], "released by compare-and-set"
    finally:
        kill_vmms_under(home)
