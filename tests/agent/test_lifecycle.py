"""Real machines on a real server: boot, output, exit codes, stop, restart policy, update,
in both tiers: QEMU micro-VMs and sandbox-tier containers under gVisor's runsc (CPU-only)."""

from __future__ import annotations

import base64
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from hangar.model.guest_contract import RunDir
from hangar.server_process import ServerProcess
from tests.agent.helpers import (
    console_text,
    exit_events,
    expected_port,
    machine_path,
    machine_port,
    run_machine,
    vmm_pids,
    wait_exit_recorded,
    wait_state,
)

pytestmark = pytest.mark.slow

READY_LINE = "process-ready"
"""What the tests' commands print once their signal traps are set."""


@pytest.fixture(params=["vm", "sandbox"])
def tier(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def tier_config(tier: str) -> dict[str, Any]:
    """The machine config that puts a CPU-only machine in ``tier`` (VMs are the default)."""
    return {"guest": {"tier": "sandbox"}} if tier == "sandbox" else {}


def root_of(run_dir: Path, tier: str) -> Path:
    """Where a machine's writable root lives while it runs."""
    return run_dir / (RunDir.BUNDLE if tier == "sandbox" else RunDir.ROOT_DISK)


def test_machine_runs_prints_and_reports_its_exit_code(
    api: httpx.Client, app_name: str, registry_image: str, shared_server: ServerProcess, tier: str
) -> None:
    file_value = base64.b64encode(b"from-a-file").decode()
    machine_id = run_machine(
        api,
        app_name,
        registry_image,
        cmd=["sh", "-c", 'echo "out:$GREETING:$MODE:$(cat /etc/app.conf):$(hostname)"; exit 7'],
        env={"MODE": "test"},
        files=[{"guest_path": "/etc/app.conf", "raw_value": file_value}],
        **tier_config(tier),
    )
    [exit_event] = wait_exit_recorded(api, app_name, machine_id)
    assert exit_event["exit_code"] == 7
    assert exit_event["requested_stop"] is False
    # fly-go decodes exited_at as a time.Time: RFC 3339.
    exited_at = datetime.fromisoformat(exit_event["exited_at"].replace("Z", "+00:00"))
    assert exited_at.tzinfo is not None and exit_event["exited_at"].endswith("Z")
    machine = wait_state(api, app_name, machine_id, "stopped")
    assert machine["image_ref"]["digest"].startswith("sha256:")
    assert machine["image_ref"]["repository"] == "hangar/test"
    assert machine["tier"] == tier
    assert f"out:hi:test:from-a-file:{machine_id}" in console_text(api, app_name, machine_id)
    assert vmm_pids(shared_server.home, machine_id) == []
    run_dir = shared_server.home / "machines" / machine_id
    assert not root_of(run_dir, tier).exists(), "the writable root is dropped on stop"
    assert api.delete(machine_path(app_name, machine_id)).status_code == 200
    wait_state(api, app_name, machine_id, "destroyed")
    assert not run_dir.exists()


def test_stop_signals_the_process_and_start_boots_a_fresh_disk(
    api: httpx.Client, app_name: str, test_image: str, shared_server: ServerProcess, tier: str
) -> None:
    machine_id = run_machine(
        api,
        app_name,
        test_image,
        cmd=[
            "sh",
            "-c",
            "test -e /marker && echo marker-survived; touch /marker; "
            f"trap 'echo got-term; exit 42' TERM; echo {READY_LINE}; while true; do sleep 1; done",
        ],
        **tier_config(tier),
    )
    wait_state(api, app_name, machine_id, "started")
    assert len(vmm_pids(shared_server.home, machine_id)) == 1
    # A VM's port is a tap; a sandbox machine's a veth into its own network namespace.
    assert machine_port(shared_server, machine_id) == expected_port(tier, running=True)
    base = machine_path(app_name, machine_id)
    _wait_console(api, app_name, machine_id, READY_LINE)
    response = api.post(f"{base}/stop", json={"signal": "SIGTERM", "timeout": "20s"})
    assert response.status_code == 200, response.text
    wait_state(api, app_name, machine_id, "stopped")
    assert machine_port(shared_server, machine_id) == expected_port(tier, running=False)
    [exit_event] = exit_events(api, app_name, machine_id)
    assert exit_event["exit_code"] == 42
    assert exit_event["requested_stop"] is True
    assert api.post(f"{base}/start").status_code == 200
    wait_state(api, app_name, machine_id, "started")
    _wait_console(api, app_name, machine_id, READY_LINE)
    assert "marker-survived" not in console_text(api, app_name, machine_id)
    assert api.delete(base, params={"force": "true"}).status_code == 200
    wait_state(api, app_name, machine_id, "destroyed")
    assert vmm_pids(shared_server.home, machine_id) == []


def test_stop_kills_a_guest_that_ignores_the_signal(
    api: httpx.Client, app_name: str, test_image: str, shared_server: ServerProcess, tier: str
) -> None:
    machine_id = run_machine(
        api,
        app_name,
        test_image,
        cmd=["sh", "-c", f"trap '' TERM; echo {READY_LINE}; while true; do sleep 1; done"],
        **tier_config(tier),
    )
    wait_state(api, app_name, machine_id, "started")
    _wait_console(api, app_name, machine_id, READY_LINE)
    base = machine_path(app_name, machine_id)
    assert api.post(f"{base}/stop", json={"timeout": "1s"}).status_code == 200
    wait_state(api, app_name, machine_id, "stopped")
    assert vmm_pids(shared_server.home, machine_id) == []
    assert api.delete(base).status_code == 200


def test_on_failure_policy_restarts_up_to_max_retries(
    api: httpx.Client, app_name: str, test_image: str, tier: str
) -> None:
    machine_id = run_machine(
        api,
        app_name,
        test_image,
        cmd=["sh", "-c", "exit 3"],
        restart={"policy": "on-failure", "max_retries": 1},
        **tier_config(tier),
    )
    exits = wait_exit_recorded(api, app_name, machine_id, count=2)
    assert [item["exit_code"] for item in exits] == [3, 3]
    wait_state(api, app_name, machine_id, "stopped")
    events = api.get(machine_path(app_name, machine_id) + "/events").json()
    assert sum(1 for event in events if event["type"] == "restart") == 1


def test_auto_destroy_destroys_after_exit(
    api: httpx.Client, app_name: str, test_image: str, shared_server: ServerProcess, tier: str
) -> None:
    machine_id = run_machine(api, app_name, test_image, auto_destroy=True, **tier_config(tier))
    wait_state(api, app_name, machine_id, "destroyed")
    [exit_event] = exit_events(api, app_name, machine_id)
    assert exit_event["exit_code"] == 0
    assert not (shared_server.home / "machines" / machine_id).exists()
    listed = api.get(machine_path(app_name), params={"include_deleted": "true"}).json()
    assert [item["state"] for item in listed] == ["destroyed"]


def test_update_replaces_the_config_and_reboots(
    api: httpx.Client, app_name: str, test_image: str, tier: str
) -> None:
    machine_id = run_machine(
        api,
        app_name,
        test_image,
        cmd=["sh", "-c", "echo version-one; sleep 600"],
        **tier_config(tier),
    )
    wait_state(api, app_name, machine_id, "started")
    base = machine_path(app_name, machine_id)
    before = api.get(base).json()
    config = {
        "image": test_image,
        "init": {"cmd": ["sh", "-c", "echo version-two; sleep 600"]},
        "restart": {"policy": "no"},
        "stop_config": {"timeout": "1s"},
        **tier_config(tier),
    }
    response = api.post(base, json={"config": config})
    assert response.status_code == 200, response.text
    deadline = time.monotonic() + 180
    while api.get(base).json()["version"] != "2" and time.monotonic() < deadline:
        time.sleep(0.2)
    after = wait_state(api, app_name, machine_id, "started")
    assert after["version"] == "2"
    assert after["instance_id"] != before["instance_id"]
    assert after["tier"] == tier
    _wait_console(api, app_name, machine_id, "version-two")
    assert api.delete(base, params={"force": "true"}).status_code == 200


def _wait_console(api: httpx.Client, app_name: str, machine_id: str, text: str) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if text in console_text(api, app_name, machine_id):
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared on the console of {machine_id}")


def test_a_vmm_that_dies_first_is_explained_in_the_exit_event(
    api: httpx.Client, app_name: str, test_image: str, shared_server: ServerProcess, tier: str
) -> None:
    """QEMU (or the sandbox's shim) killed under a running guest: the guest reported
    nothing, and the machine's exit event says what the driver saw instead."""
    import os
    import signal

    machine_id = run_machine(
        api,
        app_name,
        test_image,
        cmd=["sh", "-c", "while true; do sleep 1; done"],
        **tier_config(tier),
    )
    wait_state(api, app_name, machine_id, "started")
    [pid] = vmm_pids(shared_server.home, machine_id)
    os.kill(pid, signal.SIGKILL)
    [exit_event] = wait_exit_recorded(api, app_name, machine_id)
    assert exit_event["guest_exit_code"] == -1, (
        "no code reported: -1, an integer as fly-go reads it"
    )
    expected = {
        "vm": "QEMU exited before the guest reported an exit",
        "sandbox": "the sandbox ended before its exit code was recorded",
    }
    assert expected[tier] in exit_event["guest_error"]
    wait_state(api, app_name, machine_id, "stopped")
