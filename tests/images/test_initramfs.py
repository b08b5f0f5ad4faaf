from __future__ import annotations

import gzip
import lzma
import subprocess
from pathlib import Path

import pytest

from hangar.errors import GuestBootError
from hangar.images.cpio import NewcArchive
from hangar.images.initramfs import (
    GUEST_MODULES,
    MODULE_LIST,
    NVIDIA_NODES,
    base_archive,
    ensure_base_initramfs,
    init_script,
    machine_initrd,
    nvidia_nodes_script,
    resolve_modules,
)
from hangar.images.kernel import GuestKernel
from hangar.images.run_config import GuestFile, GuestRunConfig

VERSION = "6.1.0-99-cloud-amd64"
# The virtio lines of Debian 6.1 cloud kernel's modules.dep (depmod output), as on disk.
MODULES_DEP = """\
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko \
kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/virtio_console.ko.xz: kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko \
kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
"""
BUILTIN = "kernel/fs/ext4/ext4.ko\nkernel/drivers/tty/serial/8250/8250.ko\n"
EXPECTED_ORDER = [
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/drivers/block/virtio_blk.ko",
    "kernel/drivers/char/virtio_console.ko.xz",
    "kernel/net/core/failover.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/drivers/net/virtio_net.ko",
]


@pytest.fixture
def kernel_tree(tmp_path: Path) -> GuestKernel:
    """A kernel tree laid out as ``dpkg -x`` + ``depmod`` leave it, with stand-in modules."""
    modules_dir = tmp_path / "lib" / "modules" / VERSION
    modules_dir.mkdir(parents=True)
    (modules_dir / "modules.dep").write_text(MODULES_DEP.replace("\\\n", ""))
    (modules_dir / "modules.builtin").write_text(BUILTIN)
    for line in MODULES_DEP.replace("\\\n", "").splitlines():
        module = modules_dir / line.partition(":")[0]
        module.parent.mkdir(parents=True, exist_ok=True)
        content = f"module {module.name}".encode()
        module.write_bytes(lzma.compress(content) if module.name.endswith(".xz") else content)
    vmlinuz = tmp_path / "boot" / f"vmlinuz-{VERSION}"
    vmlinuz.parent.mkdir()
    vmlinuz.write_bytes(b"kernel")
    return GuestKernel(vmlinuz=vmlinuz, modules_dir=modules_dir, version=VERSION)


def _list(archive: bytes) -> list[str]:
    return (
        subprocess.run(["cpio", "--quiet", "-t"], input=archive, check=True, capture_output=True)
        .stdout.decode()
        .split()
    )


def _extract(archive: bytes, name: str) -> bytes:
    return subprocess.run(
        ["cpio", "--quiet", "-i", "--to-stdout", name],
        input=archive,
        check=True,
        capture_output=True,
    ).stdout


def test_resolves_modules_with_dependencies_first(kernel_tree: GuestKernel) -> None:
    assert resolve_modules(kernel_tree.modules_dir, GUEST_MODULES) == EXPECTED_ORDER
    assert resolve_modules(kernel_tree.modules_dir, ["virtio-net"]) == [
        "kernel/drivers/virtio/virtio_ring.ko",
        "kernel/drivers/virtio/virtio.ko",
        "kernel/net/core/failover.ko",
        "kernel/drivers/net/net_failover.ko",
        "kernel/drivers/net/virtio_net.ko",
    ]


def test_skips_builtin_modules_and_rejects_unknown_ones(kernel_tree: GuestKernel) -> None:
    assert resolve_modules(kernel_tree.modules_dir, ["ext4", "virtio_ring"]) == [EXPECTED_ORDER[0]]
    with pytest.raises(GuestBootError) as raised:
        resolve_modules(kernel_tree.modules_dir, ["nvidia"])
    assert raised.value.fields["module"] == "nvidia"


def test_base_archive_holds_busybox_modules_and_init(kernel_tree: GuestKernel) -> None:
    archive = base_archive(kernel_tree).to_bytes()
    names = set(_list(archive))
    assert {"init", "bin/busybox", "bin/sh", "bin/nsenter", "dev/console", "newroot"} <= names
    load_order = _extract(archive, MODULE_LIST).decode().split()
    assert load_order == [Path(path).name.removesuffix(".xz") for path in EXPECTED_ORDER]
    assert {f"lib/modules/{name}" for name in load_order} <= names
    assert _extract(archive, "lib/modules/virtio_console.ko") == b"module virtio_console.ko.xz"
    assert _extract(archive, "init") == init_script()
    assert _extract(archive, NVIDIA_NODES) == nvidia_nodes_script()


def _run_config() -> GuestRunConfig:
    return GuestRunConfig(
        machine_id="m-7",
        argv=["sh", "-c", "echo hello"],
        env={"A": "1"},
        hostname="m-7",
        files=[GuestFile(guest_path="/etc/motd", raw_value="aGk=")],
    )


def test_machine_initrd_appends_an_archive_to_the_base(tmp_path: Path) -> None:
    base_content = NewcArchive()
    base_content.file("init", b"#!/bin/sh\n", 0o755)
    base = tmp_path / "base.cpio.gz"
    base.write_bytes(gzip.compress(base_content.to_bytes()) + b"odd")  # not 4-aligned
    initrd = machine_initrd(base, _run_config(), tmp_path / "machine" / "initrd")

    data = initrd.read_bytes()
    assert data.startswith(base.read_bytes())
    appended = data[len(base.read_bytes()) :].lstrip(b"\0")
    offset = len(data) - len(appended)
    assert offset % 4 == 0
    assert _list(appended) == [
        "hangar",
        "hangar/run.json",
        "hangar/run.env",
        "hangar/hostname",
        "hangar/hosts",
        "hangar/files",
        "hangar/files/0",
    ]
    assert (
        GuestRunConfig.model_validate_json(_extract(appended, "hangar/run.json")) == _run_config()
    )
    assert _extract(appended, "hangar/files/0") == b"hi"
    assert b"HANGAR_FILE_0_PATH=/etc/motd" in _extract(appended, "hangar/run.env")
    assert _list(gzip.decompress(data[: len(base.read_bytes()) - 3])) == ["init"]


@pytest.mark.slow
def test_base_initramfs_for_the_real_kernel_is_built_once(
    guest_kernel: GuestKernel, tmp_path: Path
) -> None:
    first = ensure_base_initramfs(guest_kernel, tmp_path)
    built_at = first.stat().st_mtime_ns
    assert ensure_base_initramfs(guest_kernel, tmp_path) == first
    assert first.stat().st_mtime_ns == built_at
    archive = gzip.decompress(first.read_bytes())
    load_order = _extract(archive, MODULE_LIST).decode().split()
    assert load_order == [f"{name}.ko" for name in GUEST_MODULES]
    assert [entry.name for entry in tmp_path.joinpath("initramfs").iterdir() if entry.is_dir()] == [
        first.parent.name
    ]
