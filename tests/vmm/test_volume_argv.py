"""Volumes on the QEMU command line: a qcow2 node (LUKS with a file secret when encrypted),
a virtio-blk disk whose serial is the volume's name, and key files that never outlive launch."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest
from pydantic import ValidationError

from hangar.errors import VmmError
from hangar.vmm.accel import tcg_choice
from hangar.vmm.driver import VmSpec, VolumeDiskSpec
from hangar.vmm.qemu import QemuDriver, QemuTimeouts

TCG = tcg_choice("test")
PLAIN = "vol_0123456789abcdef"
SECRET = "vol_fedcba9876543210"


def make_spec(root: Path, volumes: list[VolumeDiskSpec]) -> VmSpec:
    for name in ("vmlinuz", "initrd", "root.ext4"):
        (root / name).touch()
    return VmSpec.in_run_dir(
        machine_id="m1",
        run_dir=root / "run",
        kernel=root / "vmlinuz",
        initrd=root / "initrd",
        root_disk=root / "root.ext4",
        volumes=volumes,
    )


def volume(root: Path, name: str, encrypted: bool, **changes: object) -> VolumeDiskSpec:
    image = root / f"{name}.qcow2"
    image.touch()
    key_file = None
    if encrypted:
        key_file = root / f"{name}.key"
        key_file.write_text("not a real passphrase")
    return VolumeDiskSpec(name=name, image=image, key_file=key_file).model_copy(update=changes)


def values_of(argv: list[str], flag: str) -> list[str]:
    return [value for option, value in itertools.pairwise(argv) if option == flag]


def test_volumes_follow_the_disks_as_qcow2_nodes_with_their_serial(tmp_path: Path) -> None:
    spec = make_spec(
        tmp_path, [volume(tmp_path, PLAIN, False), volume(tmp_path, SECRET, True, read_only=True)]
    )
    argv = QemuDriver(accel=TCG).prepare(spec)

    assert values_of(argv, "-object") == [
        f"secret,id={SECRET}-key,file={tmp_path / (SECRET + '.key')}"
    ]
    assert values_of(argv, "-blockdev") == [
        f"driver=file,node-name={PLAIN}-file,filename={tmp_path / (PLAIN + '.qcow2')},"
        "discard=unmap",
        f"driver=qcow2,node-name={PLAIN},file={PLAIN}-file,discard=unmap",
        f"driver=file,node-name={SECRET}-file,filename={tmp_path / (SECRET + '.qcow2')},"
        "discard=unmap,read-only=on",
        f"driver=qcow2,node-name={SECRET},file={SECRET}-file,discard=unmap,read-only=on,"
        f"encrypt.format=luks,encrypt.key-secret={SECRET}-key",
    ]
    devices = values_of(argv, "-device")
    assert devices[0] == "virtio-blk-pci,drive=disk0"  # the root disk stays first
    assert devices[1:3] == [
        f"virtio-blk-pci,drive={PLAIN},id={PLAIN}-disk,serial={PLAIN},werror=enospc,rerror=report",
        f"virtio-blk-pci,drive={SECRET},id={SECRET}-disk,serial={SECRET},"
        "werror=enospc,rerror=report",
    ]
    assert "not a real passphrase" not in " ".join(argv)


def test_a_missing_image_or_key_file_is_named(tmp_path: Path) -> None:
    encrypted = volume(tmp_path, SECRET, True)
    assert encrypted.key_file is not None
    encrypted.key_file.unlink()
    with pytest.raises(VmmError) as missing:
        QemuDriver(accel=TCG).prepare(make_spec(tmp_path, [encrypted]))
    assert missing.value.fields["field"] == "volumes[0].key_file"


@pytest.mark.parametrize(
    "names",
    [["vol-with-dash"], ["0starts_with_digit"], ["a" * 21], [PLAIN, PLAIN], ["v"] * 9],
)
def test_volume_names_must_be_serials_and_distinct(tmp_path: Path, names: list[str]) -> None:
    with pytest.raises(ValidationError):
        make_spec(
            tmp_path,
            [VolumeDiskSpec(name=name, image=tmp_path / "x") for name in names],
        )


def test_launch_removes_key_files_even_when_qemu_fails(tmp_path: Path) -> None:
    encrypted = volume(tmp_path, SECRET, True)
    spec = make_spec(tmp_path, [encrypted])
    driver = QemuDriver(accel=TCG, binary="false", timeouts=QemuTimeouts(launch_s=10))
    with pytest.raises(VmmError):
        asyncio.run(driver.launch(spec))
    assert encrypted.key_file is not None
    assert not encrypted.key_file.exists()

    missing_image = volume(tmp_path, PLAIN, True)
    missing_image.image.unlink()
    with pytest.raises(VmmError):
        asyncio.run(driver.launch(make_spec(tmp_path, [missing_image])))
    assert missing_image.key_file is not None
    assert not missing_image.key_file.exists()
