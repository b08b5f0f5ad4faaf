from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pytest

from hangar.errors import GuestBootError
from hangar.images.kernel import KERNEL_ENV, MODULES_ENV, GuestKernel, ensure_kernel
from hangar.images.runner import Argv, CommandError, run_command


def _configured_tree(root: Path) -> tuple[Path, Path]:
    vmlinuz = root / "vmlinuz"
    vmlinuz.write_bytes(b"kernel")
    modules = root / "modules" / "6.8.0-custom"
    modules.mkdir(parents=True)
    (modules / "modules.dep").write_text("")
    return vmlinuz, modules


def test_configured_kernel_wins(tmp_path: Path) -> None:
    vmlinuz, modules = _configured_tree(tmp_path)
    assert ensure_kernel(tmp_path / "cache", vmlinuz=vmlinuz, modules=modules) == GuestKernel(
        vmlinuz=vmlinuz, modules_dir=modules, version="6.8.0-custom"
    )
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("setting", "vmlinuz", "modules"),
    [
        (KERNEL_ENV, "missing-vmlinuz", "modules/6.8.0-custom"),
        (MODULES_ENV, "vmlinuz", None),
        (MODULES_ENV, "vmlinuz", "."),
    ],
)
def test_configured_kernel_must_be_complete(
    tmp_path: Path, setting: str, vmlinuz: str, modules: str | None
) -> None:
    _configured_tree(tmp_path)
    with pytest.raises(GuestBootError) as raised:
        ensure_kernel(
            tmp_path / "cache",
            vmlinuz=tmp_path / vmlinuz,
            modules=None if modules is None else tmp_path / modules,
        )
    assert raised.value.fields["setting"] == setting


class ListsMissingOnce:
    """Runs the real commands, except that the first apt query fails as it does on a
    host without package lists, and ``apt-get update`` is only recorded."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(
        self,
        argv: Argv,
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> str:
        words = [os.fspath(word) for word in argv]
        self.calls.append(words)
        if words[:2] == ["apt-cache", "show"] and len(self.calls) == 1:
            raise CommandError(words, 100, "E: No packages found")
        if words[:2] == ["apt-get", "update"]:
            return ""
        return run_command(words, cwd=cwd, env=env, timeout=timeout)


def _refuse(argv: Argv, **_: object) -> str:
    raise AssertionError(f"cached kernel must need no command, ran {argv}")


@pytest.mark.slow
def test_fetches_debian_cloud_kernel_once(tmp_path: Path) -> None:
    runner = ListsMissingOnce()
    kernel = ensure_kernel(tmp_path, runner=runner)

    assert [call[:2] for call in runner.calls] == [
        ["apt-cache", "show"],
        ["apt-get", "update"],
        ["apt-cache", "show"],
        ["apt-get", "download"],
        ["dpkg", "-x"],
        ["depmod", "-b"],
    ]
    assert kernel.version.endswith("-cloud-amd64")
    assert kernel.vmlinuz.read_bytes()[0x202:0x206] == b"HdrS"  # x86 boot protocol header
    assert (kernel.modules_dir / "kernel" / "drivers" / "block" / "virtio_blk.ko").is_file()
    assert "virtio_blk.ko:" in (kernel.modules_dir / "modules.dep").read_text()
    assert ensure_kernel(tmp_path, runner=_refuse) == kernel
    leftovers = {entry.name for entry in (tmp_path / "kernels").iterdir()}
    assert {name for name in leftovers if not name.endswith(".lock")} == {
        "debian-cloud.json",
        kernel.version,
    }
