"""Boot a machine as hangar's QEMU driver would (TCG, hangar's kernel, initrd and init) and
collect what it printed and reported; a hard QEMU timeout bounds every boot."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hangar.images.initramfs import machine_initrd
from hangar.images.kernel import GuestKernel
from hangar.images.rootfs import CachedImage, machine_disk
from hangar.images.run_config import GuestRunConfig

QEMU_TIMEOUT_SECONDS = 120
KERNEL_ARGS = "console=ttyS0 reboot=t panic=-1 quiet tsc=reliable no_timer_check"


@dataclass(frozen=True)
class Boot:
    console: str
    ctl: list[dict[str, Any]]


def _qemu_argv(
    kernel: GuestKernel,
    initrd: Path,
    disk: Path,
    folder: Path,
    sig_chardev: str,
    read_only_disks: Sequence[Path],
    kernel_args: Sequence[str] = (),
) -> list[str]:
    extra_disks: list[str] = []
    for index, extra in enumerate(read_only_disks):
        extra_disks += [
            "-drive", f"id=extra{index},file={extra},format=raw,if=none,readonly=on",
            "-device", f"virtio-blk-pci,drive=extra{index}",
        ]  # fmt: skip
    return [
        "qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-m", "256",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-serial", f"file:{folder / 'console.log'}",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd),
        "-append", " ".join([KERNEL_ARGS, *kernel_args]),
        "-drive", f"id=root,file={disk},format=raw,if=none",
        "-device", "virtio-blk-pci,drive=root",
        *extra_disks,
        "-device", "virtio-serial-pci,id=vs",
        "-chardev", f"file,id=ctl,path={folder / 'ctl.jsonl'}",
        "-device", "virtserialport,bus=vs.0,chardev=ctl,name=hangar.ctl",
        "-chardev", sig_chardev,
        "-device", "virtserialport,bus=vs.0,chardev=sig,name=hangar.sig",
    ]  # fmt: skip


def _ctl_events(folder: Path) -> list[dict[str, Any]]:
    path = folder / "ctl.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.strip()]


@dataclass(frozen=True)
class RunningGuest:
    """A booting guest a test talks to as hangar's driver would. Waits poll the guest's
    files; the QEMU timeout (which kills it) bounds every one of them."""

    folder: Path
    qemu: subprocess.Popen[bytes]

    def _wait_until(self, done: Callable[[], bool], what: str) -> None:
        while not done():
            assert self.qemu.poll() is None, f"the guest ended before {what}"
            time.sleep(0.05)

    def wait_for_event(self, event: dict[str, Any]) -> None:
        self._wait_until(lambda: event in _ctl_events(self.folder), f"event {event}")

    def wait_for_console(self, text: str) -> None:
        console = self.folder / "console.log"
        self._wait_until(lambda: text in console.read_text(errors="replace"), repr(text))

    def send_signal(self, signum: int) -> None:
        """One line a connection, half-closed, then wait for QEMU to close its side (it has
        read the line), as hangar.vmm.signal_port does."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.connect(str(self.folder / "sig.sock"))
            connection.sendall(f"signal {signum}\n".encode())
            connection.shutdown(socket.SHUT_WR)
            assert connection.recv(1) == b""


def boot(
    kernel: GuestKernel,
    base_initrd: Path,
    image: CachedImage,
    config: GuestRunConfig,
    folder: Path,
    interact: Callable[[RunningGuest], None] | None = None,
    read_only_disks: Sequence[Path] = (),
    kernel_args: Sequence[str] = (),
) -> Boot:
    """Boot the machine to its end; ``interact`` runs while it does. ``read_only_disks``
    follow the root disk (the first is /dev/vdb), as the driver attaches extra disks."""
    initrd = machine_initrd(base_initrd, config, folder / "initrd")
    disk = machine_disk(image, folder / "root.ext4")
    sig_chardev = f"socket,id=sig,path={folder / 'sig.sock'},server=on,wait=off"
    argv = _qemu_argv(kernel, initrd, disk, folder, sig_chardev, read_only_disks, kernel_args)
    qemu = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    guard = threading.Timer(QEMU_TIMEOUT_SECONDS, qemu.kill)
    guard.start()
    try:
        if interact is not None:
            interact(RunningGuest(folder, qemu))
        _, stderr = qemu.communicate()
    finally:
        guard.cancel()
        qemu.kill()
        qemu.wait()
    assert qemu.returncode == 0, stderr.decode(errors="replace")
    console = (folder / "console.log").read_text(errors="replace")
    return Boot(console=console, ctl=_ctl_events(folder))
