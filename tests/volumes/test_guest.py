"""Volumes in real guests (QEMU under TCG, hangar's kernel, initrd and init):

- a file written on a volume in one machine is read back in another after the first is gone,
  through a plain and an encrypted volume, whose image on the host has no plaintext;
- a volume extended while stopped mounts at its new size; one extended while running
  (QMP ``block_resize``) grows in the guest at once;
- a snapshot taken before more writes restores into a new volume with the old content (one
  taken while the machine runs too), and a fork of the encrypted volume taken while it runs
  carries its data under a key of its own after the source is deleted;
- a host disk that fills during a write pauses the machine, names the volume, corrupts
  nothing, and the write completes once space is freed.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from hangar.bench.guest import GuestKit, GuestResult, OneOffGuest
from hangar.clock import SystemClock
from hangar.errors import Unprocessable
from hangar.vmm.proc import read_process
from hangar.volumes.host import VolumeHost
from hangar.volumes.model import (
    GIB,
    ForkOf,
    FromSnapshot,
    VolumeSpec,
    new_snapshot_id,
    new_volume_id,
)
from hangar.volumes.online import describe_io_errors, resume_vm, volume_io_errors
from tests.volumes.helpers import MIB

pytestmark = pytest.mark.slow

BOOT_TIMEOUT_S = 240.0
PLAIN_TEXT = "plain-marker-4d1c9e"
SECRET_TEXT = "secret-marker-8b72f0"


def volume(encrypted: bool) -> VolumeSpec:
    return VolumeSpec(id=new_volume_id(), size_gb=1, encrypted=encrypted)


def df_kib(result: GuestResult, mount: str) -> int:
    """The 1K-blocks df printed for ``mount``, the last time it did."""
    sizes = [line.split()[1] for line in result.output() if line.endswith(f" {mount}")]
    assert sizes, result.console
    return int(sizes[-1])


def ok(result: GuestResult) -> GuestResult:
    assert result.exit_code == 0, result.console
    return result


def test_volumes_outlive_machines_grow_snapshot_and_fork(
    guest_kit: GuestKit, host: VolumeHost
) -> None:
    plain, secret = volume(encrypted=False), volume(encrypted=True)
    asyncio.run(host.create_plan(plain).execute())
    asyncio.run(host.create_plan(secret).execute())

    # Machine 1 formats both volumes and writes to them.
    write = (
        f"echo {PLAIN_TEXT} > /data/first; "
        f"for i in $(seq 64); do echo {SECRET_TEXT}; done > /secret/note; sync"
    )
    first = OneOffGuest(
        guest_kit,
        "m-one",
        ["sh", "-c", write],
        mounts=[
            (host.attachment(plain.id, "m-one"), "/data"),
            (host.attachment(secret.id, "m-one"), "/secret"),
        ],
    )
    result = ok(asyncio.run(first.run(BOOT_TIMEOUT_S)))
    assert [(e["id"], e["path"], e["formatted"]) for e in result.events_of("volume")] == [
        (plain.id, "/data", True),
        (secret.id, "/secret", True),
    ]
    assert PLAIN_TEXT.encode() in host.layout.image(plain.id).read_bytes()
    assert SECRET_TEXT.encode() not in host.layout.image(secret.id).read_bytes()

    # Stopped: snapshot the plain volume, then extend it.
    snapshot_id = new_snapshot_id()
    asyncio.run(host.snapshot_plan(plain.id, snapshot_id).execute())
    host.check_extend(plain.id, 2)
    asyncio.run(host.extend_plan(plain.id, 2).execute())

    # Machine 2 reads both, writes more, and sees the encrypted volume grow while it runs.
    running_snapshot_id = new_snapshot_id()
    fork = VolumeSpec(id=new_volume_id(), size_gb=2, encrypted=True)
    read_and_grow = (
        "cat /data/first; head -1 /secret/note; echo later > /data/later; sync; "
        "df -k /data /secret; echo waiting-for-growth; "
        'while [ "$(df -k /secret | awk "NR==2 {print \\$2}")" -lt 1500000 ]; do usleep 50000; '
        "done; df -k /secret"
    )

    async def second_machine() -> GuestResult:
        attachments = [
            (host.attachment(plain.id, "m-two"), "/data"),
            (host.attachment(secret.id, "m-two"), "/secret"),
        ]
        key_file = attachments[1][0].key_file
        assert key_file is not None and key_file.exists()
        with host.keys.secret_file(secret.id) as passphrase_file:
            passphrase = passphrase_file.read_text()
        guest = OneOffGuest(guest_kit, "m-two", ["sh", "-c", read_and_grow], mounts=attachments)
        qmp = guest.qmp_socket
        try:
            handle = await guest.start()
            assert not key_file.exists(), "the key file is gone once QEMU has started"
            info = read_process(handle.pid)
            assert info is not None and passphrase not in " ".join(info.cmdline)
            await guest.wait_for_console("waiting-for-growth", BOOT_TIMEOUT_S)
            # While it runs: a snapshot after the later write, and a fork of the encrypted
            # volume (both through QEMU's monitor), then the online extend.
            await host.snapshot_plan(plain.id, running_snapshot_id, qmp_socket=qmp).execute()
            fork_plan = host.create_plan(fork, ForkOf(volume_id=secret.id), source_qmp=qmp)
            await fork_plan.execute()
            await host.extend_plan(secret.id, 2, qmp_socket=qmp).execute()
            return await guest.wait_exit(BOOT_TIMEOUT_S)
        finally:
            await guest.close()

    result = ok(asyncio.run(second_machine()))
    output = result.output()
    assert output[:2] == [PLAIN_TEXT, SECRET_TEXT]
    mounted = {e["id"]: e for e in result.events_of("volume")}
    assert mounted[plain.id]["size_bytes"] == 2 * GIB
    assert not mounted[plain.id]["formatted"] and not mounted[secret.id]["formatted"]
    assert df_kib(result, "/data") > 1_900_000, "grown offline, seen at mount"
    assert result.events_of("volume_resized") == [
        {"type": "volume_resized", "id": secret.id, "size_bytes": 2 * GIB}
    ]
    assert df_kib(result, "/secret") > 1_900_000, "grown online, seen at once"
    assert host.info(secret.id).virtual_size == 2 * GIB

    # Each snapshot restores into a new volume with the content of its time; the fork
    # carries the encrypted volume's data under its own key, and outlives its source.
    restored, restored_later = (
        VolumeSpec(id=new_volume_id(), size_gb=2, encrypted=False) for _ in range(2)
    )
    for target, snapshot in ((restored, snapshot_id), (restored_later, running_snapshot_id)):
        source = FromSnapshot(volume_id=plain.id, snapshot_id=snapshot)
        host.check_create(target, source)
        asyncio.run(host.create_plan(target, source).execute())
    assert host.info(secret.id).snapshots == [], "the fork's snapshot was released"
    asyncio.run(host.delete_plan(secret.id).execute())

    check = "cat /old/first; ls -1 /old; echo --; ls -1 /later; head -1 /copy/note"
    third = OneOffGuest(
        guest_kit,
        "m-three",
        ["sh", "-c", check],
        mounts=[
            (host.attachment(restored.id, "m-three"), "/old"),
            (host.attachment(restored_later.id, "m-three"), "/later"),
            (host.attachment(fork.id, "m-three"), "/copy"),
        ],
    )
    result = ok(asyncio.run(third.run(BOOT_TIMEOUT_S)))
    output = result.output()
    assert output[0] == PLAIN_TEXT
    before, after = output.index("--"), len(output)
    assert "first" in output[:before] and "later" not in output[:before]
    assert "later" in output[before:after]
    assert SECRET_TEXT in output
    assert SECRET_TEXT.encode() not in host.layout.image(fork.id).read_bytes()


def test_a_full_host_disk_pauses_the_machine_and_loses_nothing(
    guest_kit: GuestKit, small_disk_host: VolumeHost, small_disk: Path
) -> None:
    host = small_disk_host
    with pytest.raises(Unprocessable):
        host.check_create(volume(encrypted=False))  # 1 GB does not fit on 96 MiB: a 422
    victim, other = volume(encrypted=False), volume(encrypted=False)
    for spec in (victim, other):
        asyncio.run(host.create_plan(spec).execute())  # sparse: they fit until written
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\xff" * (40 * MIB))

    script = (
        "head -c 1048576 /dev/urandom > /other/keep; sync; md5sum /other/keep; "
        "dd if=/dev/urandom of=/victim/big bs=1M count=70 conv=fsync 2>/dev/null; "
        "md5sum /other/keep; ls -l /victim/big"
    )

    async def fill() -> GuestResult:
        guest = OneOffGuest(
            guest_kit,
            "m-full",
            ["sh", "-c", script],
            mounts=[
                (host.attachment(victim.id, "m-full"), "/victim"),
                (host.attachment(other.id, "m-full"), "/other"),
            ],
        )
        try:
            handle = await guest.start()
            async with asyncio.timeout(BOOT_TIMEOUT_S):
                while not (status := await guest.driver.status(handle)).error:
                    assert status.state == "running", guest.console()
                    await asyncio.sleep(0.1)
            assert status.vm_state == "io-error"
            assert "io-error" in (status.error or "")  # what the machine's events will say
            errors = await volume_io_errors(guest.qmp_socket, clock=SystemClock())
            assert errors == {victim.id: "nospace"}
            assert "host's disk is full" in describe_io_errors(errors)
            assert host.check_image(other.id).get("corruptions", 0) == 0
            ballast.unlink()
            await resume_vm(guest.qmp_socket, clock=SystemClock())
            return await guest.wait_exit(BOOT_TIMEOUT_S)
        finally:
            await guest.close()

    result = ok(asyncio.run(fill()))
    sums = [line.split()[0] for line in result.output() if line.endswith("/other/keep")]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert any(line.split()[4] == str(70 * MIB) for line in result.output() if "big" in line)
    assert host.check_image(victim.id).get("corruptions", 0) == 0
    assert shutil.disk_usage(small_disk).free > 0
