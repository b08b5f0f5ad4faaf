"""Volumes through the API with real guests (QEMU under TCG, hangar's kernel and init), on a
server in this process whose volumes live on a loop-mounted ext4 disk of their own:

- two machines racing for the same volumes: exactly one starts, the other fails at
  ``attach_volumes`` with the winner named, having launched nothing;
- the winner writes to a plain and an encrypted volume; while it runs: a volume it has
  cannot be deleted, mounted by another machine, or attached to it without a relaunch (409s);
  a snapshot is taken (through QEMU) and the plain volume extended (the guest sees the new
  size at once), after which the guest writes more and exits;
- the encrypted image, read on the host, holds none of the plaintext;
- the encrypted volume is extended while no machine has it; the snapshot is restored into a
  new volume; a second machine mounts all three and reads back the later data, the old data
  from the restore, and the secret at the new size;
- a host disk that fills during a write pauses the machine, the machine's events say which
  volume and why, the agent resumes it once space is freed, and the other volume is intact;
- a sandbox-tier machine (runsc) mounts a plain and an encrypted volume (mounted by the host),
  writes to them; while it runs the volume cannot be deleted, is snapshotted and extended
  through the storage daemon; once it stops nothing of the mount is left, and a VM mounts the
  same volumes (and the snapshot's restore) and reads what the container wrote, at the new
  size: one volume format for both tiers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hangar.model.volume import VolumeState
from hangar.settings import DATABASE
from hangar.volumes import VolumeHost
from hangar.volumes.host_mount import CAP_SYS_RESOURCE, has_capability
from tests.agent.helpers import machine_path, wait_state
from tests.api.helpers import assert_fly_error, unique, wait_runs_finished
from tests.api.invariants import store_violations
from tests.conftest import RUNSC, kill_vmms_under
from tests.fixtures.inprocess import InProcessServer

pytestmark = pytest.mark.slow

DISK_GB = 3
MIB = 1 << 20
GIB = 1 << 30
PLAIN_TEXT = "plain-marker-5e1a77"
MORE_TEXT = "later-marker-0c93d2"
SECRET_TEXT = "secret-marker-a4f610"
WAIT_S = 240.0
POLL_S = 0.2
GROWTH_POLLS = 2400
"""The winner waits for its disk to grow for at most this many polls of 0.2 s."""

WINNER = (
    f"echo {PLAIN_TEXT} > /data/first; "
    f"for i in $(seq 64); do echo {SECRET_TEXT}; done > /secret/note; sync; "
    "df -k /data /secret; echo phase-one-written; "
    "size() { df -k /data | awk 'NR==2 {print $2}'; }; start=$(size); n=0; "
    f'while [ "$(size)" = "$start" ] && [ $n -lt {GROWTH_POLLS} ]; '
    "do usleep 200000; n=$((n+1)); done; "
    f"df -k /data; echo {MORE_TEXT} > /data/first; sync; echo phase-two-written"
)
READER = "cat /data/first; cat /restored/first; head -1 /secret/note; df -k /secret"


@pytest.fixture(scope="module")
def volume_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 3 GB ext4 disk of its own (a sparse file, loop-mounted): volumes fill it, not the
    host's disk."""
    if os.geteuid() != 0:
        pytest.skip("mounting a loop device needs root")
    folder = tmp_path_factory.mktemp("volume-disk")
    image, mount_point = folder / "disk.img", folder / "mnt"
    mount_point.mkdir()
    with image.open("wb") as disk:
        disk.truncate(DISK_GB * GIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, volume_disk: Path
) -> Iterator[InProcessServer]:
    home = tmp_path_factory.mktemp("volumes-home")
    try:
        with InProcessServer(
            home,
            volumes_dir=volume_disk / "volumes",
            volume_reserve_gb=0,
            net=False,
            proxy=False,
            runsc=RUNSC,
        ) as running:
            yield running
    finally:
        kill_vmms_under(home, volume_disk / "volumes")


@pytest.fixture
def api(server: InProcessServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


@pytest.fixture
def app(api: httpx.Client) -> str:
    name = unique("vols")
    assert api.post("/v1/apps", json={"app_name": name}).status_code == 201
    return name


def library(server: InProcessServer) -> VolumeHost:
    volumes = server.embedded.agent.host.volumes
    assert volumes is not None
    return volumes.host


def create_volume(api: httpx.Client, app: str, **body: Any) -> dict[str, Any]:
    response = api.post(f"/v1/apps/{app}/volumes", json=body)
    assert response.status_code == 200, response.text
    volume: dict[str, Any] = response.json()
    assert volume["state"] == "created", volume
    return volume


def volume_of(api: httpx.Client, app: str, volume_id: str) -> dict[str, Any]:
    response = api.get(f"/v1/apps/{app}/volumes/{volume_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def machine(
    api: httpx.Client,
    app: str,
    image: str,
    script: str,
    mounts: list[tuple[str, str]],
) -> str:
    """A machine created without being launched (its image resolved)."""
    config = {
        "image": image,
        "init": {"cmd": ["sh", "-c", script]},
        "restart": {"policy": "no"},
        "mounts": [{"volume": volume_id, "path": path} for volume_id, path in mounts],
    }
    machine_id = config_machine(api, app, config, skip_launch=True)
    wait_runs_finished(api, app, machine_id)
    return machine_id


def config_machine(api: httpx.Client, app: str, config: dict[str, Any], skip_launch: bool) -> str:
    body = {"config": config, "skip_launch": skip_launch}
    response = api.post(machine_path(app), json=body)
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def console(api: httpx.Client, app: str, machine_id: str) -> str:
    """The machine's console, its lines ending in ``\n`` (a serial console ends them in
    ``\r\n``)."""
    return api.get(machine_path(app, machine_id) + "/logs").text.replace("\r\n", "\n")


def wait_console(api: httpx.Client, app: str, machine_id: str, text: str) -> str:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        output = console(api, app, machine_id)
        if text in output:
            return output
        state = api.get(machine_path(app, machine_id)).json()["state"]
        assert state in ("starting", "started"), f"{state}:\n{output}"
        time.sleep(POLL_S)
    raise AssertionError(f"{text!r} never appeared:\n{console(api, app, machine_id)}")


def wait_settled(api: httpx.Client, app: str, machine_id: str) -> dict[str, Any]:
    """The machine once it is started or has failed, and its runs are done."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        current: dict[str, Any] = api.get(machine_path(app, machine_id)).json()
        if current["state"] in ("started", "failed", "launch_failed", "stopped"):
            wait_runs_finished(api, app, machine_id)
            return dict(api.get(machine_path(app, machine_id)).json())
        time.sleep(POLL_S)
    raise AssertionError(f"machine {machine_id} never settled")


def output_lines(text: str) -> list[str]:
    return text.split("hangar-init: ready\n", 1)[-1].splitlines()


def df_kib(text: str, mount: str) -> list[int]:
    """The 1K-blocks df printed for ``mount``, each time it did."""
    return [int(line.split()[1]) for line in output_lines(text) if line.endswith(f" {mount}")]


def destroy(api: httpx.Client, app: str, machine_id: str) -> None:
    response = api.delete(machine_path(app, machine_id), params={"force": "true"})
    assert response.status_code == 200, response.text
    wait_state(api, app, machine_id, "destroyed")


def test_volumes_race_persist_snapshot_extend_and_restore(
    server: InProcessServer, api: httpx.Client, app: str, test_image: str
) -> None:
    plain = create_volume(api, app, name="data", encrypted=False)
    secret = create_volume(api, app, name="secret")
    mounts = [(plain["id"], "/data"), (secret["id"], "/secret")]

    # Two machines race for the same two volumes: exactly one wins.
    racers = [machine(api, app, test_image, WINNER, mounts) for _ in range(2)]
    for machine_id in racers:
        started = api.post(machine_path(app, machine_id) + "/start")
        assert started.status_code == 200, started.text
    settled = {machine_id: wait_settled(api, app, machine_id) for machine_id in racers}
    winners = [m for m in racers if settled[m]["state"] == "started"]
    assert len(winners) == 1, settled
    [winner] = winners
    [loser] = [m for m in racers if m != winner]
    assert settled[loser]["state"] == "failed"
    assert settled[loser]["failure_reason"].startswith("attach_volumes:")
    assert f"attached to machine {winner}" in settled[loser]["failure_reason"]
    for volume in (plain, secret):
        assert volume_of(api, app, volume["id"])["attached_machine_id"] == winner
    [*_, lost] = api.get(machine_path(app, loser) + "/runs").json()
    assert lost["status"] == "failed" and "launch_vm" not in lost["steps_done"], "never launched"
    assert "detach_volumes" in lost["rollback_done"]

    wait_console(api, app, winner, "phase-one-written")
    # While it runs: no delete, no second machine, no attach without a relaunch.
    refused = api.delete(f"/v1/apps/{app}/volumes/{plain['id']}")
    assert_fly_error(refused, 409, f"attached to machine {winner}")
    third = api.post(
        machine_path(app),
        json={"config": {"image": test_image, "mounts": [{"volume": plain["id"], "path": "/d"}]}},
    )
    assert_fly_error(third, 409, f"attached to machine {winner}")
    spare = create_volume(api, app, name="spare", encrypted=False)
    current = api.get(machine_path(app, winner)).json()["config"]
    current["mounts"].append({"volume": spare["id"], "path": "/spare"})
    update = api.post(machine_path(app, winner), json={"config": current, "skip_launch": True})
    assert_fly_error(update, 409, "while it runs")

    # A snapshot and an extend of the running machine's volume, through QEMU.
    snapshot = api.post(f"/v1/apps/{app}/volumes/{plain['id']}/snapshots")
    assert snapshot.status_code == 200, snapshot.text
    extended = api.put(f"/v1/apps/{app}/volumes/{plain['id']}/extend", json={"size_gb": 2})
    assert extended.status_code == 200, extended.text
    assert extended.json()["volume"]["size_gb"] == 2
    assert not extended.json()["needs_restart"]
    written = wait_console(api, app, winner, "phase-two-written")
    sizes = df_kib(written, "/data")
    assert sizes[0] < 1_100_000 < 1_900_000 < sizes[-1], sizes
    wait_state(api, app, winner, "stopped")
    wait_runs_finished(api, app, winner)
    assert volume_of(api, app, plain["id"])["attached_machine_id"] is None, "detached at exit"
    images = library(server).layout
    assert SECRET_TEXT.encode() not in images.image(secret["id"]).read_bytes()
    assert MORE_TEXT.encode() in images.image(plain["id"]).read_bytes()
    for machine_id in racers:
        destroy(api, app, machine_id)

    # Stopped: extend the encrypted volume; restore the snapshot into a new volume.
    extended = api.put(f"/v1/apps/{app}/volumes/{secret['id']}/extend", json={"size_gb": 2})
    assert extended.status_code == 200, extended.text
    restored = create_volume(api, app, name="restored", snapshot_id=snapshot.json()["id"])
    assert restored["snapshot_id"] == snapshot.json()["id"]
    assert restored["source_volume_id"] == plain["id"] and restored["encrypted"]

    reader = machine(api, app, test_image, READER, [*mounts, (restored["id"], "/restored")])
    assert api.post(machine_path(app, reader) + "/start").status_code == 200
    wait_state(api, app, reader, "stopped")
    text = console(api, app, reader)
    lines = output_lines(text)
    assert lines[:3] == [MORE_TEXT, PLAIN_TEXT, SECRET_TEXT], text
    assert df_kib(text, "/secret")[-1] > 1_900_000, "grown while stopped, seen at mount"
    destroy(api, app, reader)

    assert store_violations(server.home / DATABASE, server.home / "machines") == []
    for volume in (plain, secret, restored, spare):
        gone = api.delete(f"/v1/apps/{app}/volumes/{volume['id']}")
        assert gone.status_code == 200, gone.text
        assert gone.json()["state"] == VolumeState.DESTROYED
        assert not images.image(volume["id"]).exists()


def test_a_full_disk_pauses_the_machine_says_why_and_it_goes_on(
    server: InProcessServer, api: httpx.Client, app: str, test_image: str, volume_disk: Path
) -> None:
    victim = create_volume(api, app, name="victim", encrypted=False)
    other = create_volume(api, app, name="other", encrypted=False)
    script = (
        "head -c 1048576 /dev/urandom > /other/keep; sync; md5sum /other/keep; "
        "echo filling; dd if=/dev/urandom of=/victim/big bs=1M count=70 conv=fsync 2>/dev/null; "
        "md5sum /other/keep; ls -l /victim/big"
    )
    config = {
        "image": test_image,
        "init": {"cmd": ["sh", "-c", script]},
        "restart": {"policy": "no"},
        "mounts": [
            {"volume": victim["id"], "path": "/victim"},
            {"volume": other["id"], "path": "/other"},
        ],
    }
    machine_id = config_machine(api, app, config, skip_launch=True)
    wait_runs_finished(api, app, machine_id)
    ballast = volume_disk / "ballast"
    with ballast.open("wb") as filler:
        os.posix_fallocate(filler.fileno(), 0, shutil.disk_usage(volume_disk).free - 40 * MIB)
    try:
        assert api.post(machine_path(app, machine_id) + "/start").status_code == 200
        events = wait_events(api, app, machine_id, "io_error")
        [paused] = [e for e in events if e["type"] == "volume" and e["status"] == "io_error"]
        assert "request" not in paused or paused["request"] is None
        assert f"volume {victim['id']}: the host's disk is full" in paused["reason"]
        assert other["id"] not in paused["reason"]
        assert library(server).check_image(other["id"]).get("corruptions", 0) == 0
        assert api.get(machine_path(app, machine_id)).json()["state"] == "started"
    finally:
        ballast.unlink()
    wait_events(api, app, machine_id, "resumed")
    wait_state(api, app, machine_id, "stopped")
    lines = output_lines(console(api, app, machine_id))
    sums = [line.split()[0] for line in lines if line.endswith("/other/keep")]
    assert len(sums) == 2 and sums[0] == sums[1], lines
    assert any(line.split()[4] == str(70 * MIB) for line in lines if "big" in line), lines
    exits = [
        e for e in api.get(machine_path(app, machine_id) + "/events").json() if e["type"] == "exit"
    ]
    assert exits[0]["request"]["exit_event"]["exit_code"] == 0
    destroy(api, app, machine_id)
    for volume in (victim, other):
        assert api.delete(f"/v1/apps/{app}/volumes/{volume['id']}").status_code == 200


def wait_events(api: httpx.Client, app: str, machine_id: str, status: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        events: list[dict[str, Any]] = api.get(machine_path(app, machine_id) + "/events").json()
        if any(e["type"] == "volume" and e["status"] == status for e in events):
            return events
        time.sleep(POLL_S)
    raise AssertionError(f"no volume {status} event:\n{console(api, app, machine_id)}")


SANDBOX_WRITER = (
    f"echo {PLAIN_TEXT} > /data/first; "
    f"for i in $(seq 64); do echo {SECRET_TEXT}; done > /secret/note; sync; "
    "echo phase-one-written; trap 'exit 0' TERM; while true; do sleep 1; done"
)


def test_a_sandbox_machine_mounts_volumes_a_vm_reads_after(
    server: InProcessServer, api: httpx.Client, app: str, test_image: str
) -> None:
    plain = create_volume(api, app, name="sbdata", encrypted=False)
    secret = create_volume(api, app, name="sbsecret")
    mounts = [(plain["id"], "/data"), (secret["id"], "/secret")]
    config = {
        "image": test_image,
        "init": {"cmd": ["sh", "-c", SANDBOX_WRITER]},
        "restart": {"policy": "no"},
        "guest": {"tier": "sandbox"},
        "mounts": [{"volume": volume_id, "path": path} for volume_id, path in mounts],
    }
    writer = config_machine(api, app, config, skip_launch=False)
    wait_state(api, app, writer, "started")
    assert api.get(machine_path(app, writer)).json()["config"]["guest"]["tier"] == "sandbox"
    wait_console(api, app, writer, "phase-one-written")
    host_mounts = library(server).mounts
    assert host_mounts.owned_by(writer) == sorted([plain["id"], secret["id"]])
    for volume in (plain, secret):
        assert volume_of(api, app, volume["id"])["attached_machine_id"] == writer
    refused = api.delete(f"/v1/apps/{app}/volumes/{plain['id']}")
    assert_fly_error(refused, 409, f"attached to machine {writer}")

    # While it runs, through the storage daemon that has the image open.
    snapshot = api.post(f"/v1/apps/{app}/volumes/{plain['id']}/snapshots")
    assert snapshot.status_code == 200, snapshot.text
    extended = api.put(f"/v1/apps/{app}/volumes/{plain['id']}/extend", json={"size_gb": 2})
    assert extended.status_code == 200, extended.text
    assert extended.json()["volume"]["size_gb"] == 2
    # Grown at once where ext4 may be resized online; on these test machines (no
    # CAP_SYS_RESOURCE) at the next mount, and the answer says a restart is needed.
    assert extended.json()["needs_restart"] is not has_capability(CAP_SYS_RESOURCE)

    assert api.post(machine_path(app, writer) + "/stop").status_code == 200
    wait_state(api, app, writer, "stopped")
    wait_runs_finished(api, app, writer)
    assert host_mounts.owners() == {}, "unmounted, its daemon and loop device gone"
    for volume in (plain, secret):
        assert host_mounts.daemon_pid(volume["id"]) is None
        assert volume_of(api, app, volume["id"])["attached_machine_id"] is None
    images = library(server).layout
    assert SECRET_TEXT.encode() not in images.image(secret["id"]).read_bytes()
    destroy(api, app, writer)

    # A VM mounts the same volumes and the snapshot's restore, and reads the container's data.
    restored = create_volume(api, app, name="sbrestored", snapshot_id=snapshot.json()["id"])
    reader = machine(api, app, test_image, READER, [*mounts, (restored["id"], "/restored")])
    assert api.post(machine_path(app, reader) + "/start").status_code == 200
    wait_state(api, app, reader, "stopped")
    text = console(api, app, reader)
    assert output_lines(text)[:3] == [PLAIN_TEXT, PLAIN_TEXT, SECRET_TEXT], text
    destroy(api, app, reader)
    assert store_violations(server.home / DATABASE, server.home / "machines") == []
    for volume in (plain, secret, restored):
        assert api.delete(f"/v1/apps/{app}/volumes/{volume['id']}").status_code == 200
