"""Crash injection: SIGKILL the server right after each step of start, stop and destroy, start it
again over the same home, and check the machine reaches the intended state with nothing leaked;
for VM machines and for sandbox-tier machines (runsc) alike."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from hangar.agent.engine import CRASH_AFTER_STEP_FILE_ENV
from hangar.model.guest_contract import RunDir
from hangar.model.run import DestroyRequest, StartRequest, StopRequest
from hangar.server_process import ServerProcess
from hangar.volumes.host_mount import HostMounts, state_root_for
from tests.agent.helpers import (
    expected_port,
    machine_path,
    machine_port,
    run_machine,
    step_names,
    vmm_pids,
    wait_state,
)
from tests.conftest import running_server

pytestmark = pytest.mark.slow

APP = "crashes"
SLEEPER = ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]
TIERS = ("vm", "sandbox")
SANDBOX_NO_OPS = frozenset(
    {
        "attach_volumes",
        "claim_gpu_groups",
        "bind_gpus",
        "prepare_nvlink",
        "prepare_root_disk",
        "prepare_initrd",
        "map_gpu_addresses",
        "collect_gpu_xids",
        "detach_volumes",
        "mount_volumes",
        "unmount_volumes",
    }
)
"""Steps with nothing to do for a CPU-only sandbox machine: a crash after one is a crash after
the step before it, which is tested already (a sandbox machine's volume steps are tested with a
volume, in ``test_a_crash_around_a_sandbox_machines_volume_leaks_nothing``)."""
VOLUME_MOUNT_STEPS = frozenset({"mount_volumes", "unmount_volumes"})
"""No-ops for a VM (its guest mounts its volumes)."""


def crash_points(steps: list[str]) -> list[tuple[str, str]]:
    """(step, tier) for every step of a VM's plan and every step a sandbox machine acts in."""
    return [
        (step, tier)
        for tier in TIERS
        for step in steps
        if step not in (VOLUME_MOUNT_STEPS if tier == "vm" else SANDBOX_NO_OPS)
    ]


def tier_guest(tier: str) -> dict[str, dict[str, str]]:
    return {"guest": {"tier": "sandbox"}} if tier == "sandbox" else {}


CRASH_TARGET = "crash-after-step"
"""The file in a crash test server's home that arms it (see ``crash_during``)."""


@contextmanager
def armable_server(home: Path, app: str) -> Iterator[ServerProcess]:
    """A server that reads the step to crash after from a file in its home at each step."""
    env = {CRASH_AFTER_STEP_FILE_ENV: str(home / CRASH_TARGET)}
    with running_server(home, app, env=env) as server:
        yield server


@pytest.fixture(scope="module")
def crash_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with armable_server(tmp_path_factory.mktemp("crash-home"), APP) as server:
        yield server


def crash_during(server: ServerProcess, operation: str, step: str, request: httpx.Request) -> None:
    """Arm the running ``server`` (an :func:`armable_server`) to die after
    ``operation:step``, send the request, see it die, and start it again (unarmed: the crash
    consumed the file)."""
    target = server.home / CRASH_TARGET
    target.write_text(f"{operation}:{step}")
    try:
        with server.client() as api:
            response = api.send(request)
            assert response.status_code == 200, response.text
        assert server.wait_exit(timeout_s=180) == -9, server.log_tail()
        assert not target.exists(), "the crash consumes its target"
    finally:
        target.unlink(missing_ok=True)
    server.start()


def assert_no_leaks(
    server: ServerProcess, machine_id: str, running: bool, tier: str = "vm"
) -> None:
    home = server.home
    assert machine_port(server, machine_id) == expected_port(tier, running)
    pids = vmm_pids(home, machine_id)
    run_dir = home / "machines" / machine_id
    root = run_dir / ("bundle/rootfs" if tier == "sandbox" else RunDir.ROOT_DISK)
    if running:
        assert len(pids) == 1, pids
        assert root.exists()
    else:
        assert pids == []
        assert not root.exists()
        assert not (run_dir / RunDir.ROOT_DISK).exists()
        assert not (run_dir / "initrd.img").exists()
        assert not (run_dir / "bundle").exists()


@pytest.mark.parametrize(("step", "tier"), crash_points(step_names(StartRequest())))
def test_crash_during_start(
    crash_server: ServerProcess, test_image: str, step: str, tier: str
) -> None:
    with crash_server.client() as api:
        response = api.post(
            machine_path(APP),
            json={
                "config": {
                    "image": test_image,
                    "init": {"cmd": SLEEPER},
                    "restart": {"policy": "no"},
                    **tier_guest(tier),
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
        assert_no_leaks(crash_server, machine_id, running=True, tier=tier)
        _destroy(api, crash_server, machine_id)


@pytest.mark.parametrize(("step", "tier"), crash_points(step_names(StopRequest())))
def test_crash_during_stop(
    crash_server: ServerProcess, test_image: str, step: str, tier: str
) -> None:
    with crash_server.client() as api:
        machine_id = run_machine(api, APP, test_image, cmd=SLEEPER, **tier_guest(tier))
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
        assert_no_leaks(crash_server, machine_id, running=False, tier=tier)
        _destroy(api, crash_server, machine_id)


@pytest.mark.parametrize(("step", "tier"), crash_points(step_names(DestroyRequest(force=True))))
def test_crash_during_destroy(
    crash_server: ServerProcess, test_image: str, step: str, tier: str
) -> None:
    with crash_server.client() as api:
        machine_id = run_machine(api, APP, test_image, cmd=SLEEPER, **tier_guest(tier))
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
    assert_no_leaks(crash_server, machine_id, running=False, tier=tier)
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
        assert_no_leaks(crash_server, machine_id, running=True)
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


def volume_crash_points() -> list[tuple[str, str]]:
    """(operation, step): each step of start and stop that works on a machine's volumes,
    and the launch and release of its container around them."""
    return [
        (operation, step)
        for operation, request in (("start", StartRequest()), ("stop", StopRequest()))
        for step in step_names(request)
        if "volume" in step or step in ("launch_vm", "release_vm")
    ]


BOOT_COUNTER = [
    "sh",
    "-c",
    "echo boot >> /data/boots; sync; trap 'exit 0' TERM; while true; do sleep 1; done",
]


@pytest.mark.parametrize(("operation", "step"), volume_crash_points())
def test_a_crash_around_a_sandbox_machines_volume_leaks_nothing(
    crash_server: ServerProcess, test_image: str, operation: str, step: str
) -> None:
    """A sandbox machine's volume is mounted by the host (a storage daemon, a loop device, a
    mount): after a crash at any of its steps, a started machine has it mounted once, a
    stopped one has nothing of it left, and it is attached exactly while the machine runs."""
    mounts = HostMounts(state_root_for(crash_server.home / "volumes"))
    with crash_server.client() as api:
        created = api.post(f"/v1/apps/{APP}/volumes", json={"name": "crashvol", "size_gb": 1})
        assert created.status_code == 200, created.text
        volume_id = created.json()["id"]
        config = {
            "image": test_image,
            "init": {"cmd": BOOT_COUNTER},
            "restart": {"policy": "no"},
            "guest": {"tier": "sandbox"},
            "mounts": [{"volume": volume_id, "path": "/data"}],
        }
        body = {"config": config, "skip_launch": operation == "start"}
        response = api.post(machine_path(APP), json=body)
        assert response.status_code == 200, response.text
        machine_id = response.json()["id"]
        _wait_runs_idle(api, machine_id)
        if operation == "stop":
            wait_state(api, APP, machine_id, "started")
            _wait_runs_idle(api, machine_id)
    action = httpx.Request("POST", f"{crash_server.url}{machine_path(APP, machine_id)}/{operation}")
    crash_during(crash_server, operation, step, action)
    with crash_server.client() as api:
        running = operation == "start"
        wait_state(api, APP, machine_id, "started" if running else "stopped")
        _wait_runs_idle(api, machine_id)
        assert_no_leaks(crash_server, machine_id, running=running, tier="sandbox")
        volume = api.get(f"/v1/apps/{APP}/volumes/{volume_id}").json()
        if running:
            assert mounts.owned_by(machine_id) == [volume_id]
            assert mounts.daemon_pid(volume_id) is not None
            assert (mounts.paths(volume_id).fs / "boots").read_text() == "boot\n"
            assert volume["attached_machine_id"] == machine_id
        else:
            assert mounts.owners() == {}
            assert mounts.daemon_pid(volume_id) is None
            assert volume["attached_machine_id"] is None
        _destroy(api, crash_server, machine_id)
        assert mounts.owners() == {}
        gone = api.delete(f"/v1/apps/{APP}/volumes/{volume_id}")
        assert gone.status_code == 200, gone.text
