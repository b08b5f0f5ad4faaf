"""The key store: per-volume random keys wrapped by a 0600 host key; passphrases reach
qemu-img only as short-lived 0600 files, never on a command line or in an error."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from hangar.errors import VolumeError
from hangar.images.runner import Argv, run_command
from hangar.volumes.host import VolumeHost
from hangar.volumes.keys import KeyStore
from hangar.volumes.layout import VolumeLayout
from hangar.volumes.model import VolumeSpec, new_snapshot_id, new_volume_id
from hangar.volumes.qemu_img import QemuImg
from hangar.volumes.settings import VolumeSettings


def store(tmp_path: Path) -> KeyStore:
    return KeyStore(VolumeLayout(tmp_path / "volumes"))


def passphrase(keys: KeyStore, volume_id: str) -> bytes:
    with keys.secret_file(volume_id) as path:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        return path.read_bytes()


def test_keys_are_random_per_volume_wrapped_and_stable(tmp_path: Path) -> None:
    keys = store(tmp_path)
    first, second = new_volume_id(), new_volume_id()
    keys.create(first)
    keys.create(second)
    secret = passphrase(keys, first)

    assert len(secret) >= 44
    assert secret != passphrase(keys, second)
    keys.create(first)  # idempotent: the key is kept
    assert passphrase(keys, first) == secret
    wrapped = (tmp_path / "volumes" / "keys" / f"{first}.key").read_bytes()
    assert secret not in wrapped
    assert stat.S_IMODE(keys.host_key_file.stat().st_mode) == 0o600


def test_a_wrapped_key_is_bound_to_its_volume_and_its_host_key(tmp_path: Path) -> None:
    keys = store(tmp_path)
    first, second = new_volume_id(), new_volume_id()
    keys.create(first)
    layout = VolumeLayout(tmp_path / "volumes")
    layout.key(second).write_bytes(layout.key(first).read_bytes())
    with pytest.raises(VolumeError, match="does not unwrap"):
        passphrase(keys, second)

    other_host = KeyStore(layout, tmp_path / "other-host.key")
    with pytest.raises(VolumeError, match="does not unwrap") as refused:
        passphrase(other_host, first)
    assert not refused.value.retryable


def test_a_host_key_others_may_read_is_refused(tmp_path: Path) -> None:
    keys = store(tmp_path)
    keys.create(new_volume_id())
    os.chmod(keys.host_key_file, 0o644)
    with pytest.raises(VolumeError, match="make it 0600"):
        keys.create(new_volume_id())


def test_a_missing_key_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="key is missing"):
        passphrase(store(tmp_path), new_volume_id())


class RecordingRunner:
    """The real runner, keeping every argv it ran."""

    def __init__(self) -> None:
        self.argvs: list[list[str]] = []

    def __call__(self, argv: Argv, **kwargs: object) -> str:
        self.argvs.append([os.fspath(word) for word in argv])
        return run_command(argv, **kwargs)  # type: ignore[arg-type]


def test_no_passphrase_on_any_command_line_or_in_errors(tmp_path: Path) -> None:
    runner = RecordingRunner()
    host = VolumeHost(
        VolumeSettings(root=tmp_path / "volumes", reserve_bytes=0), qemu_img=QemuImg(runner)
    )
    spec = VolumeSpec(id=new_volume_id(), size_gb=1, encrypted=True)

    async def work() -> None:
        await host.create_plan(spec).execute()
        await host.snapshot_plan(spec.id, new_snapshot_id()).execute()
        await host.extend_plan(spec.id, 2).execute()

    asyncio.run(work())
    secret = passphrase(host.keys, spec.id).decode()
    assert runner.argvs
    assert all(secret not in " ".join(argv) for argv in runner.argvs)
    # A key that does not open the image: the error names the image, not the key.
    host.layout.key(spec.id).unlink()
    host.keys.create(spec.id)
    with pytest.raises(VolumeError) as failed:
        asyncio.run(host.extend_plan(spec.id, 3).execute())
    wrong = passphrase(host.keys, spec.id).decode()
    text = f"{failed.value.message} {failed.value.fields}"
    assert secret not in text
    assert wrong not in text
    assert list(host.layout.run_dir.iterdir()) == []
