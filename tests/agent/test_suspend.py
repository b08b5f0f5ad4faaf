"""Suspend, resume, exec, ps and secrets through the API, on real guests of the shared server.

One machine (a ticker that counts in memory) is booted once and used in turn: exec and ps,
then suspend and resume (its processes, memory, disk and uptime carry on), then a stop of the
suspended machine (its snapshot is dropped). A second one boots without its app's secrets,
has its snapshot corrupted (it boots cold, and its events say why), is updated while suspended,
and is destroyed with ``kill=true``. A sandbox-tier machine with a volume goes through the same
(gVisor's checkpoint and restore).
"""

from __future__ import annotations

import base64
import re
import secrets
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from hangar.model.guest_contract import RunDir
from hangar.net.links import LinkNames, port_state
from hangar.server_process import ServerProcess
from hangar.settings import DATABASE, env_name
from hangar.volumes.host_mount import HostMounts, state_root_for
from tests.agent.helpers import console_text, machine_path, run_machine, vmm_pids, wait_state
from tests.api.helpers import wait_runs_finished

pytestmark = pytest.mark.slow

TICKER = ["sh", "-c", "i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.2; done"]
SECRET_TOKEN = "tok-value-of-the-app"
FILE_CONTENT = b"a file kept in a secret\n"


@dataclass
class Booted:
    app: str
    machine_id: str

    @property
    def path(self) -> str:
        return machine_path(self.app, self.machine_id)


def exec_in(api: httpx.Client, machine: Booted, **body: Any) -> dict[str, Any]:
    response = api.post(f"{machine.path}/exec", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def ticks(text: str) -> list[int]:
    return [int(number) for number in re.findall(r"^tick (\d+)\r?$", text, re.MULTILINE)]


def wait_for_ticks(api: httpx.Client, machine: Booted, after: int, count: int = 3) -> list[int]:
    """The ticks the console shows once ``count`` more than ``after`` have been printed."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        seen = ticks(console_text(api, machine.app, machine.machine_id))
        if len([n for n in seen if n > after]) >= count or (seen and seen[-1] >= after + count):
            return seen
        time.sleep(0.2)
    raise AssertionError(f"no new ticks after {after}")


def claims_of(server: ServerProcess, machine_id: str) -> list[str]:
    connection = sqlite3.connect(f"file:{server.home / DATABASE}?mode=ro", uri=True)
    try:
        rows = connection.execute("SELECT body FROM host_states").fetchall()
    finally:
        connection.close()
    return [row[0] for row in rows if machine_id in row[0]]


def has_tap(server: ServerProcess, machine_id: str) -> bool:
    names = LinkNames(server.extra_env[env_name("net_link_prefix")])
    return port_state(names.tap(machine_id)) is not None


def uptime_s(api: httpx.Client, machine: Booted) -> float:
    return float(exec_in(api, machine, cmd="cat /proc/uptime")["stdout"].split()[0])


@pytest.fixture(scope="module")
def ticker(shared_server: ServerProcess, test_image: str) -> Iterator[Booted]:
    """A started machine whose app has secrets: one as environment, one as a file."""
    with shared_server.client() as api:
        app = f"suspend-{secrets.token_hex(3)}"
        assert api.post("/v1/apps", json={"app_name": app}).status_code == 201
        values = {"APP_TOKEN": SECRET_TOKEN, "KEY_FILE": base64.b64encode(FILE_CONTENT).decode()}
        assert api.post(f"/v1/apps/{app}/secrets", json={"values": values}).status_code == 200
        machine_id = run_machine(
            api,
            app,
            test_image,
            cmd=TICKER,
            files=[{"guest_path": "/etc/key.txt", "secret_name": "KEY_FILE"}],
            stop_config={"timeout": "2s"},
        )
        wait_state(api, app, machine_id, "started")
        yield Booted(app, machine_id)
        api.delete(machine_path(app, machine_id), params={"kill": "true"})


def test_exec_and_ps_run_inside_the_guest(api: httpx.Client, ticker: Booted) -> None:
    wait_for_ticks(api, ticker, after=0)
    assert exec_in(api, ticker, cmd="hostname")["stdout"].strip() == ticker.machine_id
    quoted = exec_in(api, ticker, cmd="sh -c 'echo \"a  b\" >&2; exit 3'")
    assert quoted == {
        "exit_code": 3,
        "stdout": "",
        "stderr": "a  b\n",
        "stdout_truncated": False,
        "stderr_truncated": False,
        "timed_out": False,
    }
    assert exec_in(api, ticker, command=["cat"], stdin="fed in")["stdout"] == "fed in"
    big = exec_in(api, ticker, command=["head", "-c", "1500000", "/dev/zero"])
    assert big["stdout_truncated"] is True and len(big["stdout"]) == 1 << 20
    slow = exec_in(api, ticker, command=["sleep", "30"], timeout=1)
    assert slow["timed_out"] is True and slow["exit_code"] == 137
    # The app's secrets: every one as environment, and a file from the one a file names.
    token = exec_in(api, ticker, cmd="""sh -c 'echo "[$APP_TOKEN]"'""")["stdout"]
    assert token == f"[{SECRET_TOKEN}]\n"
    assert exec_in(api, ticker, cmd="cat /etc/key.txt")["stdout"].encode() == FILE_CONTENT
    for body, status, field in [
        ({"cmd": ""}, 400, "cmd"),
        ({"cmd": "ls", "timeout": 0}, 400, "timeout"),
        ({"cmd": "ls", "timeout": "forever"}, 400, "timeout"),
        ({"cmd": "cat", "stdin": "x" * ((1 << 20) + 1)}, 413, "stdin"),
    ]:
        response = api.post(f"{ticker.path}/exec", json=body)
        assert response.status_code == status, response.text
        assert field in response.json()["error"]
    processes = api.get(f"{ticker.path}/ps", params={"sort_by": "pid"}).json()
    [ticking] = [p for p in processes if p["command"].startswith("sh -c i=0")]
    assert all(isinstance(ticking[key], int) for key in ("pid", "stime", "rtime", "cpu", "rss"))
    assert ticking["rss"] > 0 and ticking["listen_sockets"] == []
    assert [p["pid"] for p in processes] == sorted(p["pid"] for p in processes)


def test_a_suspended_machine_resumes_where_it_was(
    api: httpx.Client, ticker: Booted, shared_server: ServerProcess
) -> None:
    wait_for_ticks(api, ticker, after=0)
    wrote = exec_in(api, ticker, cmd="sh -c 'echo kept on the disk > /kept-state'")
    assert wrote["exit_code"] == 0, wrote
    before_pid = next(
        p["pid"]
        for p in api.get(f"{ticker.path}/ps").json()
        if p["command"].startswith("sh -c i=0")
    )
    before_uptime = uptime_s(api, ticker)

    response = api.post(f"{ticker.path}/suspend")
    assert response.status_code == 200, response.text
    machine = wait_state(api, ticker.app, ticker.machine_id, "suspended")
    wait_runs_finished(api, ticker.app, ticker.machine_id)
    run_dir = shared_server.home / "machines" / ticker.machine_id
    assert vmm_pids(shared_server.home, ticker.machine_id) == []
    assert (run_dir / "suspend.vmstate").exists() and (run_dir / "suspend.vmstate.json").exists()
    assert (run_dir / RunDir.ROOT_DISK).exists() and (run_dir / RunDir.INITRD).exists()
    assert claims_of(shared_server, ticker.machine_id) == [], "a suspended machine holds no claim"
    assert not has_tap(shared_server, ticker.machine_id)
    assert machine["state"] == "suspended"
    events = {(e["type"], e["status"], e["source"]) for e in machine["events"]}
    assert {("suspend", "requested", "user"), ("suspend", "suspended", "flyd")} <= events
    last_tick = ticks(console_text(api, ticker.app, ticker.machine_id))[-1]
    assert_fly_412(api.post(f"{ticker.path}/exec", json={"cmd": "true"}))

    started = api.post(f"{ticker.path}/start")
    assert started.status_code == 200, started.text
    assert started.json()["previous_state"] == "suspended"
    wait_state(api, ticker.app, ticker.machine_id, "started")
    seen = wait_for_ticks(api, ticker, after=last_tick)
    resumed_at = seen.index(last_tick)
    assert seen[resumed_at:] == list(range(last_tick, seen[-1] + 1)), "the count goes on"
    assert "hangar-init: resumed" in console_text(api, ticker.app, ticker.machine_id)
    assert exec_in(api, ticker, cmd="cat /kept-state")["stdout"] == "kept on the disk\n"
    after_pid = [
        p["pid"]
        for p in api.get(f"{ticker.path}/ps").json()
        if p["command"].startswith("sh -c i=0")
    ]
    assert after_pid == [before_pid]
    assert uptime_s(api, ticker) >= before_uptime
    assert not (run_dir / "suspend.vmstate.json").exists(), "the snapshot is consumed"
    assert claims_of(shared_server, ticker.machine_id) != []
    assert has_tap(shared_server, ticker.machine_id)
    events = api.get(f"{ticker.path}/events").json()
    assert any(e["type"] == "resume" and e["status"] == "resumed" for e in events)


def test_stopping_a_suspended_machine_drops_its_snapshot(
    api: httpx.Client, ticker: Booted, shared_server: ServerProcess
) -> None:
    assert api.post(f"{ticker.path}/suspend").status_code == 200
    wait_state(api, ticker.app, ticker.machine_id, "suspended")
    assert api.post(f"{ticker.path}/stop").status_code == 200
    wait_state(api, ticker.app, ticker.machine_id, "stopped")
    wait_runs_finished(api, ticker.app, ticker.machine_id)
    run_dir = shared_server.home / "machines" / ticker.machine_id
    assert sorted(p.name for p in run_dir.glob("suspend.vmstate*")) == []
    assert not (run_dir / RunDir.ROOT_DISK).exists()
    events = api.get(f"{ticker.path}/events").json()
    assert any(e["type"] == "suspend" and e["status"] == "dropped" for e in events)


def test_an_unusable_snapshot_boots_cold_and_updates_drop_snapshots(
    api: httpx.Client, app_name: str, test_image: str, shared_server: ServerProcess
) -> None:
    assert api.post(f"/v1/apps/{app_name}/secrets/APP_TOKEN", json={"value": "x"}).status_code
    body = {"image": test_image, "init": {"cmd": TICKER}, "restart": {"policy": "no"}}
    response = api.post(
        f"/v1/apps/{app_name}/machines", json={"config": body, "skip_secrets": True}
    )
    assert response.status_code == 200, response.text
    machine = Booted(app_name, response.json()["id"])
    wait_state(api, app_name, machine.machine_id, "started")
    token = exec_in(api, machine, cmd="""sh -c 'echo "[$APP_TOKEN]"'""")["stdout"]
    assert token == "[]\n", "skip_secrets"

    assert api.post(f"{machine.path}/suspend").status_code == 200
    wait_state(api, app_name, machine.machine_id, "suspended")
    wait_runs_finished(api, app_name, machine.machine_id)
    state = shared_server.home / "machines" / machine.machine_id / "suspend.vmstate"
    with state.open("r+b") as file:  # same size, different bytes: its checksum fails
        file.seek(state.stat().st_size // 2)
        file.write(b"\xde\xad\xbe\xef" * 1024)
    assert api.post(f"{machine.path}/start").status_code == 200
    wait_state(api, app_name, machine.machine_id, "started")
    events = api.get(f"{machine.path}/events").json()
    [cold] = [e for e in events if e["type"] == "resume" and e["status"] == "cold_boot"]
    assert "snapshot" in cold["reason"]
    assert uptime_s(api, machine) < 120, "a fresh boot"

    assert api.post(f"{machine.path}/suspend").status_code == 200
    wait_state(api, app_name, machine.machine_id, "suspended")
    update = {"config": {**body, "env": {"VERSION": "2"}}}
    assert api.post(machine.path, json=update).status_code == 200
    wait_runs_finished(api, app_name, machine.machine_id)
    updated = api.get(machine.path).json()
    assert updated["state"] == "stopped" and updated["version"] == "2"
    assert not state.exists()

    assert api.post(f"{machine.path}/start").status_code == 200
    wait_state(api, app_name, machine.machine_id, "started")
    assert exec_in(api, machine, cmd="sh -c 'echo $VERSION'")["stdout"] == "2\n"
    refused = api.delete(machine.path)
    assert refused.status_code == 412, refused.text
    assert api.delete(machine.path, params={"kill": "true"}).status_code == 200
    wait_state(api, app_name, machine.machine_id, "destroyed")
    assert vmm_pids(shared_server.home, machine.machine_id) == []


def assert_fly_412(response: httpx.Response) -> None:
    assert response.status_code == 412, response.text
    assert set(response.json()) == {"error", "status"}


def test_a_suspended_machine_keeps_its_volume_and_resumes_with_it(
    api: httpx.Client, app_name: str, test_image: str, shared_server: ServerProcess
) -> None:
    created = api.post(f"/v1/apps/{app_name}/volumes", json={"name": "data", "encrypted": False})
    assert created.status_code == 200, created.text
    volume_id = created.json()["id"]
    wait_volume = f"/v1/apps/{app_name}/volumes/{volume_id}"
    deadline = time.monotonic() + 120
    while api.get(wait_volume).json()["state"] != "created":
        assert time.monotonic() < deadline, api.get(wait_volume).text
        time.sleep(0.2)
    machine_id = run_machine(
        api, app_name, test_image, cmd=TICKER, mounts=[{"volume": volume_id, "path": "/data"}]
    )
    machine = Booted(app_name, machine_id)
    wait_state(api, app_name, machine_id, "started")
    mounts = api.get(machine.path).json()["config"]["mounts"]
    assert mounts == [{"volume": volume_id, "path": "/data"}], "Fly's mount, nothing added"
    wrote = exec_in(api, machine, cmd="sh -c 'echo on the volume > /data/note; sync'")
    assert wrote["exit_code"] == 0, wrote

    assert api.post(f"{machine.path}/suspend").status_code == 200
    wait_state(api, app_name, machine_id, "suspended")
    wait_runs_finished(api, app_name, machine_id)
    assert api.get(wait_volume).json()["attached_machine_id"] == machine_id, "kept attached"
    refused = api.delete(wait_volume)
    assert refused.status_code in (409, 412), refused.text

    assert api.post(f"{machine.path}/start").status_code == 200
    wait_state(api, app_name, machine_id, "started")
    events = api.get(f"{machine.path}/events").json()
    assert any(e["type"] == "resume" and e["status"] == "resumed" for e in events), events
    assert exec_in(api, machine, cmd="cat /data/note")["stdout"] == "on the volume\n"
    appended = exec_in(api, machine, cmd="sh -c 'echo after > /data/more; sync; cat /data/more'")
    assert appended["stdout"] == "after\n", "the restored guest writes to its volume"

    assert api.post(f"{machine.path}/suspend").status_code == 200
    wait_state(api, app_name, machine_id, "suspended")
    assert api.post(f"{machine.path}/stop").status_code == 200
    wait_state(api, app_name, machine_id, "stopped")
    wait_runs_finished(api, app_name, machine_id)
    assert api.get(wait_volume).json()["attached_machine_id"] is None, "stop lets go of it"
    assert api.delete(machine.path).status_code == 200
    wait_state(api, app_name, machine_id, "destroyed")
    assert api.delete(wait_volume).status_code == 200


def test_a_sandbox_machine_suspends_and_resumes_with_its_volume(
    api: httpx.Client, app_name: str, test_image: str, shared_server: ServerProcess
) -> None:
    """gVisor's checkpoint and restore: the count goes on, the volume (mounted by the host)
    is let go while suspended and mounted again; a corrupted snapshot boots cold; a stop
    drops the snapshot."""
    created = api.post(f"/v1/apps/{app_name}/volumes", json={"name": "sbx", "size_gb": 1})
    assert created.status_code == 200, created.text
    volume_id = created.json()["id"]
    machine_id = run_machine(
        api,
        app_name,
        test_image,
        cmd=TICKER,
        guest={"tier": "sandbox"},
        mounts=[{"volume": volume_id, "path": "/data"}],
    )
    machine = Booted(app_name, machine_id)
    wait_state(api, app_name, machine_id, "started")
    wrote = exec_in(api, machine, cmd="sh -c 'echo on the volume > /data/note; sync'")
    assert wrote["exit_code"] == 0, wrote
    mounts = HostMounts(state_root_for(shared_server.home / "volumes"))
    assert mounts.owned_by(machine_id) == [volume_id]
    wait_for_ticks(api, machine, after=0)

    assert api.post(f"{machine.path}/suspend").status_code == 200
    wait_state(api, app_name, machine_id, "suspended")
    wait_runs_finished(api, app_name, machine_id)
    run_dir = shared_server.home / "machines" / machine_id
    state = run_dir / "suspend.vmstate"
    assert (
        state.read_bytes().startswith(b"gVisorSF") and (run_dir / "suspend.vmstate.json").exists()
    )
    assert vmm_pids(shared_server.home, machine_id) == []
    assert mounts.owners() == {}, "unmounted from the host while suspended"
    assert not has_tap(shared_server, machine_id)
    assert claims_of(shared_server, machine_id) == []
    last_tick = ticks(console_text(api, app_name, machine_id))[-1]

    assert api.post(f"{machine.path}/start").status_code == 200
    wait_state(api, app_name, machine_id, "started")
    seen = wait_for_ticks(api, machine, after=last_tick)
    resumed_at = seen.index(last_tick)
    assert seen[resumed_at:] == list(range(last_tick, seen[-1] + 1)), "the count goes on"
    events = api.get(f"{machine.path}/events").json()
    assert any(e["type"] == "resume" and e["status"] == "resumed" for e in events), events
    assert exec_in(api, machine, cmd="cat /data/note")["stdout"] == "on the volume\n"
    assert mounts.owned_by(machine_id) == [volume_id]
    assert not state.exists(), "the snapshot is consumed"

    # A snapshot whose bytes changed is not restored: the machine boots cold, says why.
    assert api.post(f"{machine.path}/suspend").status_code == 200
    wait_state(api, app_name, machine_id, "suspended")
    wait_runs_finished(api, app_name, machine_id)
    with state.open("r+b") as file:
        file.seek(state.stat().st_size // 2)
        file.write(b"\xde\xad\xbe\xef" * 64)
    assert api.post(f"{machine.path}/start").status_code == 200
    wait_state(api, app_name, machine_id, "started")
    events = api.get(f"{machine.path}/events").json()
    [cold] = [e for e in events if e["type"] == "resume" and e["status"] == "cold_boot"]
    assert "checksum" in cold["reason"], cold
    assert exec_in(api, machine, cmd="cat /data/note")["stdout"] == "on the volume\n"

    # Stopped while suspended: the snapshot goes, nothing is mounted.
    assert api.post(f"{machine.path}/suspend").status_code == 200
    wait_state(api, app_name, machine_id, "suspended")
    assert api.post(f"{machine.path}/stop").status_code == 200
    wait_state(api, app_name, machine_id, "stopped")
    wait_runs_finished(api, app_name, machine_id)
    assert sorted(p.name for p in run_dir.glob("suspend.vmstate*")) == []
    assert mounts.owners() == {}
    assert api.delete(machine.path).status_code == 200
    wait_state(api, app_name, machine_id, "destroyed")
    assert api.delete(f"/v1/apps/{app_name}/volumes/{volume_id}").status_code == 200
