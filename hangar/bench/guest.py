"""One-off guests for benchmarks and tests: a cached image booted by :class:`QemuDriver` with
hangar's kernel, initrd and init, extra raw disks and volumes, running one command.

It is the agent's boot path without the store: the same root disk copy, machine initrd (with
the volume tools appended when volumes are mounted), :class:`VmSpec` and driver.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hangar.images.initramfs import ensure_base_initramfs, machine_initrd
from hangar.images.kernel import ensure_kernel
from hangar.images.reference import parse_image_ref
from hangar.images.rootfs import CachedImage, ImageCache, machine_disk
from hangar.images.run_config import GuestFile, GuestRunConfig, GuestVolume
from hangar.images.volume_tools import ensure_volume_tools
from hangar.model.guest_contract import RunDir
from hangar.vmm.control import read_control_events, summarise_control_events
from hangar.vmm.driver import DiskSpec, VmHandle, VmSpec, VolumeDiskSpec
from hangar.vmm.qemu import QemuDriver

POLL_S = 0.05


@dataclass(frozen=True)
class GuestKit:
    """What every boot shares: kernel, base initrd, volume tools and the image."""

    kernel: Path
    base_initrd: Path
    volume_tools: Path
    image: CachedImage

    @classmethod
    async def prepare(cls, cache: Path, image: str) -> GuestKit:
        guest_kernel = await asyncio.to_thread(ensure_kernel, cache)
        base = await asyncio.to_thread(ensure_base_initramfs, guest_kernel, cache)
        tools = await asyncio.to_thread(ensure_volume_tools, cache)
        cached = await ImageCache(cache).ensure(parse_image_ref(image))
        return cls(guest_kernel.vmlinuz, base, tools, cached)


@dataclass
class GuestResult:
    console: str
    events: list[dict[str, Any]]
    exit_code: int | None
    error: str | None

    def output(self) -> list[str]:
        """What the process printed: the console after init's ready line."""
        return self.console.split("hangar-init: ready\n", 1)[-1].splitlines()

    def events_of(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event.get("type") == kind]


@dataclass
class OneOffGuest:
    """One machine: ``argv`` run in ``kit.image`` with ``mounts`` (volume disk, guest path)
    and ``raw_disks`` attached as plain raw drives after the root disk."""

    kit: GuestKit
    machine_id: str
    argv: list[str]
    mounts: list[tuple[VolumeDiskSpec, str]] = field(default_factory=list)
    attached: list[VolumeDiskSpec] = field(default_factory=list)
    """Volumes attached without being mounted (the process sees bare disks)."""
    raw_disks: list[Path] = field(default_factory=list)
    files: list[GuestFile] = field(default_factory=list)
    memory_mb: int = 256
    driver: QemuDriver = field(default_factory=QemuDriver)
    handle: VmHandle | None = None
    run_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        # Short: unix socket paths must stay under 108 bytes.
        self.run_dir = Path(tempfile.mkdtemp(prefix="hg-vol-"))

    def _spec(self) -> VmSpec:
        config = GuestRunConfig(
            machine_id=self.machine_id,
            argv=self.argv,
            env=self.kit.image.config.env,
            hostname=self.machine_id,
            files=self.files,
            volumes=[GuestVolume(serial=disk.name, path=path) for disk, path in self.mounts],
        )
        extras = [self.kit.volume_tools] if self.mounts else []
        initrd = machine_initrd(self.kit.base_initrd, config, self.run_dir / RunDir.INITRD, extras)
        root = machine_disk(self.kit.image, self.run_dir / RunDir.ROOT_DISK)
        return VmSpec.in_run_dir(
            machine_id=self.machine_id,
            run_dir=self.run_dir,
            kernel=self.kit.kernel,
            initrd=initrd,
            root_disk=root,
            root_disk_format="raw",  # a plain copy of the image (machines get qcow2 overlays)
            extra_disks=[DiskSpec(path=path) for path in self.raw_disks],
            volumes=[disk for disk, _ in self.mounts] + self.attached,
            memory_mb=self.memory_mb,
        )

    async def start(self) -> VmHandle:
        spec = await asyncio.to_thread(self._spec)
        self.handle = await self.driver.launch(spec)
        return self.handle

    @property
    def control_log(self) -> Path:
        return self.run_dir / RunDir.CONTROL_LOG

    @property
    def console_log(self) -> Path:
        return self.run_dir / RunDir.CONSOLE_LOG

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / RunDir.QMP_SOCKET

    def console(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def wait_for_event(self, kind: str, timeout_s: float) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            while True:
                for event in read_control_events(self.control_log):
                    if event.get("type") == kind:
                        return event
                if self.handle is not None and not self.driver.is_running(self.handle):
                    raise RuntimeError(f"the guest ended before a {kind} event:\n{self.console()}")
                await asyncio.sleep(POLL_S)

    async def wait_for_console(self, text: str, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            while text not in self.console():
                if self.handle is not None and not self.driver.is_running(self.handle):
                    raise RuntimeError(f"the guest ended before {text!r}:\n{self.console()}")
                await asyncio.sleep(POLL_S)

    async def wait_exit(self, timeout_s: float) -> GuestResult:
        assert self.handle is not None, "start the guest first"
        async with asyncio.timeout(timeout_s):
            while self.driver.is_running(self.handle):
                await asyncio.sleep(POLL_S)
        status = await self.driver.status(self.handle)
        events = read_control_events(self.control_log)
        report = summarise_control_events(events)
        return GuestResult(self.console(), events, report.exit_code, status.error)

    async def run(self, timeout_s: float) -> GuestResult:
        await self.start()
        try:
            return await self.wait_exit(timeout_s)
        finally:
            await self.close()

    async def close(self) -> None:
        """Kill the VMM if it still runs and remove the run folder."""
        if self.handle is not None:
            await self.driver.kill(self.handle)
        shutil.rmtree(self.run_dir, ignore_errors=True)
