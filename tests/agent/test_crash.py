"""Crash injection: SIGKILL the server right after each step of start, stop and destroy, start it
again over the same home, and check the machine reaches the intended state with nothing leaked."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hangar.agent.engine import CRASH_AFTER_STEP_ENV
from hangar.model.guest_contract import RunDir
from hangar.model.run import DestroyRequest, StartRequest, StopRequest
from hangar.server_process import ServerProcess
from tests.agent.helpers import machine_path, run_machine, step_names, vmm_pids, wait_state
from tests.conftest import running_server

pytestmark = pytest.mark.slow

APP = "crashes"
SLEEPER = ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]


@pytest.fixture(scope="module")
def crash_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("crash-home"), APP) as server:
        yield server


def crash_during(server: ServerProcess, operation: str, step: str, request: httpx.Request) -> None:
    """Restart the server armed to die after ``operation:step``, send the request, see it die."""
    server.stop()
    server.start({CRASH_AFTER_STEP_ENV: f"{operation}:{step}"})
    with server.client() as api:
        response = api.send(request)
        assert response.status_code == 200, response.text
    assert server.wait_exit(timeout_s=180) == -9, server.log_tail()
    server.start()


def assert_no_leaks(home: Path, machine_id: str, running: bool) -> None:
    pids = vmm_pids(home, machine_id)
    run_dir = home / "machines" / machine_id
    if running:
        assert len(pids) == 1, pids
        assert (run_dir / RunDir.ROOT_DISK).exists()
    else:
        assert pids == []
        assert not (run_dir / RunDir.ROOT_DISK).exists()
        assert not (run_dir / "initrd.img").exists()


@pytest.mark.parametrize("step", step_names(StartRequest()))
def test_crash_during_start(crash_server: ServerProcess, test_image: str, step: str) -> None:
    with crash_server.client() as api:
        response = api.post(
            machine_path(APP),
            json={
                "config": {
                    "image": test_image,
                    "init": {"cmd": SLEEPER},
                    "restart": {"policy": "no"},
                },
                "skip_launch": True,
            },
        )
        machine_id = response.json()["id"]
        # `prepare` resolves the image in the background; let it finish before arming the crash.
        _wait_runs_idle(api, machine_id)
        assert api.get(machine_path(APP, machine_id)).json()["state"] == "created"
    crash_during(
        crash_server,
        "start",
        step,
        httpx.Request("POST", f"{crash_server.url}{machine_path(APP, machine_id)}/start"),
    )
    with crash_server.client() as api:
        wait_state(api, APP, machine_id, "started")
        _wait_runs_idle(api, machine_id)
        assert_no_leaks(crash_server.home, machine_id, running=True)
        _destroy(api, crash_server, machine_id)


@pytest.mark.parametrize("step", step_names(StopRequest()))
def test_crash_during_stop(crash_server: ServerProcess, test_image: str, step: str) -> None:
    with crash_server.client() as api:
        machine_id = run_machine(api, APP, test_image, cmd=SLEEPER)
        wait_state(api, APP, machine_id, "started")
        _wait_runs_idle(api, machine_id)
    crash_during(
        crash_server,
        "stop",
        step,
        httpx.Request(
            "POST",
            f"{crash_server.url}{machine_path(APP, machine_id)}/stop",
            json={"timeout": "2s"},
        ),
    )
    with crash_server.client() as api:
        wait_state(api, APP, machine_id, "stopped")
        _wait_runs_idle(api, machine_id)
        assert_no_leaks(crash_server.home, machine_id, running=False)
        _destroy(api, crash_server, machine_id)


@pytest.mark.parametrize("step", step_names(DestroyRequest(force=True)))
def test_crash_during_destroy(crash_server: ServerProcess, test_image: str, step: str) -> None:
    with crash_server.client() as api:
        machine_id = run_machine(api, APP, test_image, cmd=SLEEPER)
        wait_state(api, APP, machine_id, "started")
        _wait_runs_idle(api, machine_id)
    crash_during(
        crash_server,
        "destroy",
        step,
        httpx.Request(
            "DELETE", f"{crash_server.url}{machine_path(APP, machine_id)}", params={"force": "true"}
        ),
    )
    with crash_server.client() as api:
        wait_state(api, APP, machine_id, "destroyed")
        _wait_runs_idle(api, machine_id)
    assert_no_leaks(crash_server.home, machine_id, running=False)
    assert not (crash_server.home / "machines" / machine_id).exists()


def test_a_crash_right_after_apply_config_keeps_version_and_instance_together(
    crash_server: ServerProcess, test_image: str
) -> None:
    """The new config, its version and its instance id are written in one transaction: a
    crash after that step (where two writes once left the old instance id for good) resumes
    with all three new, and the machine boots again."""
    with crash_server.client() as api:
        machine_id = run_machine(api, APP, test_image, cmd=SLEEPER)
        before = wait_state(api, APP, machine_id, "started")
        _wait_runs_idle(api, machine_id)
        config = {**before["config"], "metadata": {"updated": "yes"}}
    crash_during(
        crash_server,
        "update",
        "apply_config",
        httpx.Request(
            "POST",
            f"{crash_server.url}{machine_path(APP, machine_id)}",
            json={"config": config},
        ),
    )
    with crash_server.client() as api:
        after = wait_state(api, APP, machine_id, "started")
        _wait_runs_idle(api, machine_id)
        after = api.get(machine_path(APP, machine_id)).json()
        assert after["config"]["metadata"] == {"updated": "yes"}
        assert int(after["version"]) == int(before["version"]) + 1
        assert after["instance_id"] != before["instance_id"]
        assert_no_leaks(crash_server.home, machine_id, running=True)
        _destroy(api, crash_server, machine_id)


def _wait_runs_idle(api: httpx.Client, machine_id: str) -> None:
    import time

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        runs = api.get(machine_path(APP, machine_id) + "/runs").json()
        if all(run["status"] in ("succeeded", "failed") for run in runs):
            return
        time.sleep(0.1)
    raise AssertionError(f"runs of {machine_id} never finished")


def _destroy(api: httpx.Client, server: ServerProcess, machine_id: str) -> None:
    assert api.delete(machine_path(APP, machine_id), params={"force": "true"}).status_code == 200
    wait_state(api, APP, machine_id, "destroyed")
    assert vmm_pids(server.home, machine_id) == []
    assert not (server.home / "machines" / machine_id).exists()
