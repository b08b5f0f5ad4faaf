"""Bootable test guests for the VMM tests.

- the test guest: hangar's guest kernel and base initramfs (busybox, virtio modules) with
  ``guest_init.sh`` appended in place of hangar's init, a guest whose behaviour each test
  picks on the kernel command line (see that script);
- the image guest: hangar's own init running a command in a real busybox image's root disk,
  as a machine runs (for what needs hangar's init: exec, suspend and resume).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec

from hangar.images.cpio import NewcArchive
from hangar.images.initramfs import ensure_base_initramfs, machine_initrd
from hangar.images.kernel import ensure_kernel
from hangar.images.reference import parse_image_ref
from hangar.images.rootfs import CachedImage, ImageCache, machine_disk
from hangar.images.run_config import GuestRunConfig
from hangar.vmm.control import read_control_events

GUEST_INIT = Path(__file__).parent / "guest_init.sh"
# Nothing in these tests may wait longer than this; it guards against hangs, and no
# test result depends on it.
HANG_GUARD_S = 180.0

P = ParamSpec("P")


@dataclass(frozen=True)
class BootArtefacts:
    kernel: Path
    initrd: Path


def build_test_guest(cache: Path, destination: Path) -> BootArtefacts:
    """The guest kernel, and at ``destination`` hangar's base initramfs with the test init."""
    kernel = ensure_kernel(cache)
    base = ensure_base_initramfs(kernel, cache)
    overlay = NewcArchive()
    overlay.file("init", GUEST_INIT.read_bytes(), 0o755)
    with destination.open("wb") as initrd:
        initrd.write(base.read_bytes())
        # The kernel unpacks archives one after the other; a later file replaces an
        # earlier one, and each archive must start on a 4-byte boundary.
        initrd.write(b"\0" * (-initrd.tell() % 4))
        initrd.write(overlay.to_bytes())
    return BootArtefacts(kernel=kernel.vmlinuz, initrd=destination)


@dataclass(frozen=True)
class ImageGuest:
    """hangar's kernel and base initramfs (with hangar's init) and a cached busybox image."""

    kernel: Path
    base_initrd: Path
    image: CachedImage

    def boot_files(self, machine_id: str, run_dir: Path, argv: list[str]) -> tuple[Path, Path]:
        """The machine's initrd (running ``argv``) and its own copy of the root disk."""
        config = GuestRunConfig(
            machine_id=machine_id,
            argv=argv,
            env=self.image.config.env,
            workdir="/tmp",
            hostname=machine_id,
        )
        initrd = machine_initrd(self.base_initrd, config, run_dir / "initrd.img")
        return initrd, machine_disk(self.image, run_dir / "root.ext4")


def build_image_guest(cache: Path, image_cache: Path, oci_image: str) -> ImageGuest:
    kernel = ensure_kernel(cache)
    image = asyncio.run(ImageCache(image_cache).ensure(parse_image_ref(oci_image)))
    return ImageGuest(
        kernel=kernel.vmlinuz, base_initrd=ensure_base_initramfs(kernel, cache), image=image
    )


async def wait_for_event(control_log: Path, event_type: str) -> list[dict[str, Any]]:
    """The events of type ``event_type``, once the guest has logged one."""
    while True:
        found = [e for e in read_control_events(control_log) if e["type"] == event_type]
        if found:
            return found
        await asyncio.sleep(0.05)


async def wait_for_console(console_log: Path, predicate: Callable[[str], bool]) -> str:
    """The console's text, once ``predicate`` holds for it."""
    while True:
        text = console_log.read_text(errors="replace") if console_log.exists() else ""
        if predicate(text):
            return text
        await asyncio.sleep(0.05)


def hang_guarded(test: Callable[P, Awaitable[None]]) -> Callable[P, Coroutine[Any, Any, None]]:
    """Fail the async test if it runs past HANG_GUARD_S instead of hanging the suite."""

    @functools.wraps(test)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> None:
        async with asyncio.timeout(HANG_GUARD_S):
            await test(*args, **kwargs)

    return guarded
