"""End to end: the pulled image boots under QEMU (TCG) with hangar's kernel, initrd and init."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hangar.images.initramfs import ensure_base_initramfs, machine_initrd
from hangar.images.kernel import GuestKernel
from hangar.images.rootfs import CachedImage, machine_disk
from hangar.images.run_config import GuestFile, GuestRunConfig, resolve_argv
from hangar.paths import cache_dir

pytestmark = pytest.mark.slow

QEMU_TIMEOUT_SECONDS = 120
KERNEL_ARGS = "console=ttyS0 reboot=t panic=-1 quiet tsc=reliable no_timer_check"


@dataclass(frozen=True)
class Boot:
    console: str
    ctl: list[dict[str, Any]]


@pytest.fixture(scope="module")
def base_initrd(guest_kernel: GuestKernel) -> Path:
    return ensure_base_initramfs(guest_kernel, cache_dir())


def _qemu_argv(
    kernel: GuestKernel, initrd: Path, disk: Path, folder: Path, sig_chardev: str
) -> list[str]:
    return [
        "qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-m", "256",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-serial", f"file:{folder / 'console.log'}",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd), "-append", KERNEL_ARGS,
        "-drive", f"id=root,file={disk},format=raw,if=none",
        "-device", "virtio-blk-pci,drive=root",
        "-device", "virtio-serial-pci,id=vs",
        "-chardev", f"file,id=ctl,path={folder / 'ctl.jsonl'}",
        "-device", "virtserialport,bus=vs.0,chardev=ctl,name=hangar.ctl",
        "-chardev", sig_chardev,
        "-device", "virtserialport,bus=vs.0,chardev=sig,name=hangar.sig",
    ]  # fmt: skip


def _ctl_events(folder: Path) -> list[dict[str, Any]]:
    path = folder / "ctl.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines]


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
) -> Boot:
    """Boot the machine to its end; ``interact`` runs while it does."""
    initrd = machine_initrd(base_initrd, config, folder / "initrd")
    disk = machine_disk(image, folder / "root.ext4")
    sig_chardev = f"socket,id=sig,path={folder / 'sig.sock'},server=on,wait=off"
    argv = _qemu_argv(kernel, initrd, disk, folder, sig_chardev)
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


def _config(image: CachedImage, **fields: Any) -> GuestRunConfig:
    defaults: dict[str, Any] = {
        "machine_id": "m-boot",
        "argv": resolve_argv(image.config),
        "env": image.config.env,
        "hostname": "m-boot",
    }
    return GuestRunConfig.model_validate({**defaults, **fields})


def test_runs_the_image_and_reports_its_exit_code(
    guest_kernel: GuestKernel, base_initrd: Path, cached_hello: CachedImage, tmp_path: Path
) -> None:
    result = boot(guest_kernel, base_initrd, cached_hello, _config(cached_hello), tmp_path)
    assert "hangar-init: ready\nhello\n" in result.console
    assert result.ctl == [{"type": "ready"}, {"type": "exit", "code": 3}]


def test_applies_user_workdir_env_hostname_and_files(
    guest_kernel: GuestKernel, base_initrd: Path, cached_hello: CachedImage, tmp_path: Path
) -> None:
    script = 'id -u; id -g; pwd; hostname; cat /etc/motd; echo "$GREETING|$HOME"; ls /dev/vport*'
    config = _config(
        cached_hello,
        argv=["sh", "-c", script],
        user="nobody",
        workdir="/srv/app",
        hostname="web-1",
        env={**cached_hello.config.env, "GREETING": "hello from config"},
        files=[GuestFile(guest_path="/etc/motd", raw_value=base64.b64encode(b"motd!\n").decode())],
    )
    result = boot(guest_kernel, base_initrd, cached_hello, config, tmp_path)
    output = result.console.split("hangar-init: ready\n", 1)[1].splitlines()
    assert output[:6] == [
        "65534",
        "65534",
        "/srv/app",
        "web-1",
        "motd!",
        "hello from config|/nonexistent",
    ]
    assert "No such file" in output[6]  # the host's ports are not in the process's /dev
    assert result.ctl == [{"type": "ready"}, {"type": "exit", "code": 1}]


def test_forwards_stop_signals_to_the_process(
    guest_kernel: GuestKernel, base_initrd: Path, cached_hello: CachedImage, tmp_path: Path
) -> None:
    """SIGTERM is trapped and survived; SIGINT (not ignored, though init started the
    process) ends it. Each comes on its own connection, as the driver sends them."""
    script = 'trap "echo got TERM" TERM; while :; do sleep 1 & wait $!; done'
    config = _config(cached_hello, argv=["sh", "-c", script])

    def stop_it(guest: RunningGuest) -> None:
        guest.wait_for_event({"type": "ready"})
        guest.send_signal(15)
        guest.wait_for_console("got TERM")
        guest.send_signal(2)

    result = boot(guest_kernel, base_initrd, cached_hello, config, tmp_path, stop_it)
    assert result.ctl == [{"type": "ready"}, {"type": "exit", "code": 128 + 2}]


def test_reports_a_command_the_image_lacks(
    guest_kernel: GuestKernel, base_initrd: Path, cached_hello: CachedImage, tmp_path: Path
) -> None:
    config = _config(cached_hello, argv=["/opt/app/server", "--port", "80"])
    result = boot(guest_kernel, base_initrd, cached_hello, config, tmp_path)
    message = "cannot run /opt/app/server: not found or not executable in the image"
    assert result.ctl == [{"type": "error", "message": message}, {"type": "exit", "code": 127}]
    assert f"hangar-init: error: {message}" in result.console
