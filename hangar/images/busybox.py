"""The host's static busybox, shipped into the initramfs and into the demo image."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hangar.images.runner import CommandRunner, run_command

HOST_BUSYBOX = Path("/bin/busybox")


def busybox_applets(
    busybox: Path = HOST_BUSYBOX, *, runner: CommandRunner = run_command
) -> list[str]:
    """The applet names this busybox was built with (``busybox --list``)."""
    return [name for name in runner([busybox, "--list"]).split() if "/" not in name]


def install_busybox(
    rootfs: Path, busybox: Path = HOST_BUSYBOX, *, runner: CommandRunner = run_command
) -> None:
    """Copy busybox to ``rootfs/bin/busybox`` and link each applet beside it."""
    bin_dir = rootfs / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, bin_dir / "busybox")
    for applet in busybox_applets(busybox, runner=runner):
        link = bin_dir / applet
        if applet != "busybox" and not os.path.lexists(link):
            link.symlink_to("busybox")
