"""Bootable guests for the VMM tests: hangar's own kernel, base initramfs and init, running a
command in the root disk of the suite's busybox test image, as a machine runs. (The real init,
not a stand-in: these tests check the guest contract from both ends.)"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec

from hangar.images.initramfs import ensure_base_initramfs, machine_initrd
from hangar.images.kernel import ensure_kernel
from hangar.images.reference import parse_image_ref
from hangar.images.rootfs import CachedImage, ImageCache, machine_disk
from hangar.images.run_config import GuestRunConfig
from hangar.vmm.control import read_control_events

# Nothing in these tests may wait longer than this; it guards against hangs, and no
# test result depends on it.
HANG_GUARD_S = 180.0

P = ParamSpec("P")


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
