"""End to end: the pulled image boots under QEMU (TCG) with hangar's kernel, initrd and init."""

from __future__ import annotations

import asyncio
import base64
import subprocess
from pathlib import Path
from typing import Any

import pytest

from hangar.images.kernel import GuestKernel
from hangar.images.rootfs import CachedImage
from hangar.images.run_config import GuestFile, GuestRunConfig, resolve_argv
from tests.images.guest_boot import RunningGuest, boot

pytestmark = pytest.mark.slow


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


def test_files_land_inside_the_root_even_through_the_images_symlinks(
    guest_kernel: GuestKernel, base_initrd: Path, tmp_path: Path, oci_layout: Path
) -> None:
    # An image whose /up points at the filesystem root: before init wrote files chrooted,
    # "/up/planted" resolved against the initramfs and never reached the process's root.
    from hangar.images.build import repack_with
    from hangar.images.reference import parse_image_ref
    from hangar.images.rootfs import ImageCache

    layout = tmp_path / "layout"
    subprocess.run(["cp", "-a", str(oci_layout), str(layout)], check=True)
    repack_with(layout, "test", lambda rootfs: (rootfs / "up").symlink_to("/"))
    image = asyncio.run(
        ImageCache(tmp_path / "cache").ensure(parse_image_ref(f"oci:{layout}:test"))
    )
    config = _config(
        image,
        argv=["sh", "-c", "cat /planted; ls /hangar 2>&1 | head -1"],
        files=[
            GuestFile(guest_path="/up/planted", raw_value=base64.b64encode(b"inside\n").decode())
        ],
    )
    result = boot(guest_kernel, base_initrd, image, config, tmp_path / "boot")
    output = result.console.split("hangar-init: ready\n", 1)[1].splitlines()
    assert output[0] == "inside"
    assert "No such file" in output[1], "the initramfs stays out of the process's reach"
