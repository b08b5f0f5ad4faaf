"""Reconciliation when the agent starts: a VMM still running is adopted, one that died while
the agent was down is recorded with its exit, and files no record owns are removed."""

from __future__ import annotations

import os
import signal
import sqlite3
from collections.abc import Iterator

import pytest

from hangar.model.guest_contract import RunDir
from hangar.server_process import ServerProcess
from tests.agent.helpers import (
    exit_events,
    machine_path,
    run_machine,
    vmm_pids,
    wait_exit_recorded,
    wait_state,
)
from tests.conftest import running_server

pytestmark = pytest.mark.slow

APP = "reconcile"
SLEEPER = ["sh", "-c", "echo up; while true; do sleep 1; done"]


@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("reconcile-home"), APP) as process:
        yield process


def test_a_running_vmm_is_adopted_after_an_agent_crash(
    server: ServerProcess, test_image: str
) -> None:
    with server.client() as api:
        machine_id = run_machine(api, APP, test_image, cmd=SLEEPER)
        wait_state(api, APP, machine_id, "started")
    [pid] = vmm_pids(server.home, machine_id)
    server.kill()
    server.start()
    with server.client() as api:
        machine = api.get(machine_path(APP, machine_id)).json()
        assert machine["state"] == "started"
        assert vmm_pids(server.home, machine_id) == [pid], "the same QEMU, adopted"
        response = api.post(machine_path(APP, machine_id) + "/stop", json={"timeout": "2s"})
        assert response.status_code == 200
        wait_state(api, APP, machine_id, "stopped")
    assert vmm_pids(server.home, machine_id) == []


def test_a_vmm_that_died_while_the_agent_was_down_is_recorded(
    server: ServerProcess, test_image: str
) -> None:
    with server.client() as api:
        machine_id = run_machine(api, APP, test_image, cmd=SLEEPER)
        wait_state(api, APP, machine_id, "started")
    [pid] = vmm_pids(server.home, machine_id)
    server.kill()
    os.kill(pid, signal.SIGKILL)
    server.start()
    with server.client() as api:
        [exit_event] = wait_exit_recorded(api, APP, machine_id)
        assert exit_event["requested_stop"] is False
        wait_state(api, APP, machine_id, "stopped")
        assert len(exit_events(api, APP, machine_id)) == 1
    run_dir = server.home / "machines" / machine_id
    assert not (run_dir / RunDir.ROOT_DISK).exists()


def test_files_and_vmms_no_record_owns_are_removed(server: ServerProcess, test_image: str) -> None:
    with server.client() as api:
        machine_id = run_machine(api, APP, test_image, cmd=SLEEPER)
        wait_state(api, APP, machine_id, "started")
    server.kill()
    stray = server.home / "machines" / "0123456789abcd"
    stray.mkdir()
    (stray / RunDir.ROOT_DISK).write_bytes(b"left behind")
    # The machine's record disappears while the agent is down (as if restored from a backup
    # taken before it existed): its VMM and run directory now belong to no record.

    with sqlite3.connect(server.home / "hangar.db") as db:
        db.execute("DELETE FROM machines WHERE id = ?", (machine_id,))
        db.execute("DELETE FROM vm_handles WHERE machine_id = ?", (machine_id,))
    server.start()
    assert not stray.exists()
    assert vmm_pids(server.home, machine_id) == []
    assert not (server.home / "machines" / machine_id).exists()
