"""The real GuestPlatform: hangar.images builds what a guest boots from; a VMM driver runs it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

from hangar.agent.platform import GuestExit, RunDirLayout, VmHandleData
from hangar.clock import Clock, SystemClock
from hangar.errors import ImageError
from hangar.images import initramfs, kernel
from hangar.images.driver_bundle import prepare_driver_bundle
from hangar.images.reference import ImageRef as ParsedImageRef
from hangar.images.reference import parse_image_ref
from hangar.images.rootfs import CachedImage, ImageCache, machine_disk
from hangar.images.run_config import GuestFile, GuestRunConfig, resolve_argv
from hangar.model.machine import ImageRef, Machine
from hangar.settings import Settings
from hangar.vmm.accel import choose_accel
from hangar.vmm.driver import DiskSpec, Driver, VmHandle, VmSpec
from hangar.vmm.proc import PROC_ROOT, read_process
from hangar.vmm.qemu import QemuDriver
from hangar.vmm.qemu_argv import HUGEPAGES_DIR


def hugepages_available(
    memory_mb: int, meminfo: Path = Path("/proc/meminfo"), mount: Path = HUGEPAGES_DIR
) -> bool:
    """GPU machines get hugepage-backed memory when the host has enough free 2 MiB pages."""
    if not mount.is_dir():
        return False
    values: dict[str, int] = {}
    for line in meminfo.read_text().splitlines():
        name, _, rest = line.partition(":")
        if rest.split():
            values[name] = int(rest.split()[0])
    free_kb = values.get("HugePages_Free", 0) * values.get("Hugepagesize", 0)
    return free_kb >= memory_mb * 1024


def to_model_ref(ref: ParsedImageRef, digest: str) -> ImageRef:
    return ImageRef(
        registry=ref.registry if ref.transport == "docker" else "oci",
        repository=ref.repository,
        tag=ref.tag or "",
        digest=digest,
    )


class QemuGuestPlatform:
    def __init__(
        self,
        cache: Path,
        driver: Driver,
        clock: Clock | None = None,
        *,
        insecure_registries: frozenset[str] = frozenset(),
        driver_bundle: Path | None = None,
        guest_kernel: Path | None = None,
        guest_modules: Path | None = None,
    ) -> None:
        """``insecure_registries``: ``host:port`` pulled without TLS verification;
        ``driver_bundle``: the GPU driver bundle; ``guest_kernel``/``guest_modules``: an
        operator's kernel instead of Debian's (each as in :mod:`hangar.settings`)."""
        self.cache_root = cache
        self.images = ImageCache(cache)
        self.driver = driver
        self.clock = clock or SystemClock()
        self.insecure_registries = insecure_registries
        self.driver_bundle = driver_bundle
        self.guest_kernel = guest_kernel
        self.guest_modules = guest_modules

    @classmethod
    def from_settings(cls, settings: Settings) -> QemuGuestPlatform:
        accel = choose_accel(forced=settings.accel, pvm_guest_kernel=settings.pvm_guest_kernel)
        return cls(
            settings.cache_dir,
            QemuDriver(accel=accel),
            insecure_registries=settings.insecure_registries,
            driver_bundle=settings.gpu_driver_bundle,
            guest_kernel=settings.guest_kernel,
            guest_modules=settings.guest_modules,
        )

    def boot_kernel(self) -> kernel.GuestKernel:
        return kernel.ensure_kernel(
            self.cache_root, vmlinuz=self.guest_kernel, modules=self.guest_modules
        )

    # images
    async def resolve_image(self, image: str) -> ImageRef:
        ref = parse_image_ref(image)
        tls_verify = ref.transport != "docker" or ref.registry not in self.insecure_registries
        cached = await self.images.ensure(ref, tls_verify=tls_verify)
        return to_model_ref(ref, cached.digest)

    def image_cached(self, image_ref: ImageRef) -> bool:
        return bool(image_ref.digest) and self.images.lookup(image_ref.digest) is not None

    def _cached(self, image_ref: ImageRef) -> CachedImage:
        cached = self.images.lookup(image_ref.digest)
        if cached is None:
            raise ImageError(
                f"image {image_ref.digest} is not in the cache", digest=image_ref.digest
            )
        return cached

    async def prepare_root_disk(self, image_ref: ImageRef, dest: Path) -> None:
        cached = self._cached(image_ref)
        partial = dest.with_name(dest.name + ".partial")
        await asyncio.to_thread(machine_disk, cached, partial)
        partial.chmod(0o600)
        partial.rename(dest)

    async def prepare_initrd(self, machine: Machine, image_ref: ImageRef, dest: Path) -> None:
        cached = self._cached(image_ref)
        config = machine.config
        image_config = cached.config
        argv = resolve_argv(image_config, config.init.exec, config.init.entrypoint, config.init.cmd)
        run_config = GuestRunConfig(
            machine_id=machine.id,
            argv=argv,
            env={**image_config.env, **config.env},
            workdir=image_config.workdir or "/",
            user=image_config.user,
            hostname=machine.id,
            driver_bundle=bool(config.guest.gpus),
            files=[
                GuestFile(
                    guest_path=item.guest_path,
                    raw_value=item.raw_value or "",
                    mode=0o644 if item.mode is None else item.mode,
                )
                for item in config.files
            ],
        )
        guest_kernel = await asyncio.to_thread(self.boot_kernel)
        base = await asyncio.to_thread(
            initramfs.ensure_base_initramfs, guest_kernel, self.cache_root
        )
        partial = dest.with_name(dest.name + ".partial")
        # The initrd holds the machine's env and files: its owner's alone from the first byte.
        partial.unlink(missing_ok=True)
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        await asyncio.to_thread(initramfs.machine_initrd, base, run_config, partial)
        partial.chmod(0o600)
        partial.rename(dest)

    # the VMM
    async def vm_spec(self, machine: Machine, run_dir: Path, gpus: list[str]) -> VmSpec:
        guest_kernel = await asyncio.to_thread(self.boot_kernel)
        extra_disks = []
        if gpus:
            bundle = await asyncio.to_thread(
                prepare_driver_bundle, guest_kernel, self.cache_root, bundle=self.driver_bundle
            )
            extra_disks.append(DiskSpec(path=bundle, read_only=True))
        return VmSpec.in_run_dir(
            machine_id=machine.id,
            run_dir=run_dir,
            kernel=guest_kernel.vmlinuz,
            initrd=run_dir / RunDirLayout.INITRD,
            root_disk=run_dir / RunDirLayout.ROOT_DISK,
            cpus=machine.config.guest.cpus,
            memory_mb=machine.config.guest.memory_mb,
            extra_disks=extra_disks,
            gpus=gpus,
            hugepages=bool(gpus) and hugepages_available(machine.config.guest.memory_mb),
        )

    async def launch(self, machine: Machine, run_dir: Path, gpus: list[str]) -> VmHandleData:
        handle = await self.driver.launch(await self.vm_spec(machine, run_dir, gpus))
        return handle.model_dump(mode="json")

    async def alive(self, handle: VmHandleData) -> bool:
        return await self.driver.adopt(VmHandle.model_validate(handle))

    def running(self, handle: VmHandleData) -> bool:
        return self.driver.is_running(VmHandle.model_validate(handle))

    async def stop(self, handle: VmHandleData, timeout_s: float, signum: int) -> None:
        await self.driver.stop(VmHandle.model_validate(handle), timeout_s, self.clock, signum)

    async def signal(self, handle: VmHandleData, signum: int) -> None:
        await self.driver.signal(VmHandle.model_validate(handle), signum)

    async def kill(self, handle: VmHandleData) -> None:
        await self.driver.kill(VmHandle.model_validate(handle))

    async def guest_exit(self, handle: VmHandleData) -> GuestExit:
        status = await self.driver.status(VmHandle.model_validate(handle))
        return GuestExit(exit_code=status.exit_code, guest_error=status.error or "")

    def vmm_processes(self, machines_dir: Path) -> dict[int, str]:
        return find_vmm_processes(machines_dir)

    def kill_process(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def find_vmm_processes(machines_dir: Path) -> dict[int, str]:
    """Live QEMU processes whose command line names a run dir under ``machines_dir``."""
    prefix = str(machines_dir.resolve()) + os.sep
    found: dict[int, str] = {}
    for entry in PROC_ROOT.iterdir():
        if not entry.name.isdigit():
            continue
        info = read_process(int(entry.name))
        if info is None or info.exited or not info.cmdline:
            continue
        if "qemu-system" not in os.path.basename(info.cmdline[0]):
            continue
        for arg in info.cmdline:
            at = arg.find(prefix)
            if at >= 0:
                found[info.pid] = arg[at + len(prefix) :].split(os.sep, 1)[0]
                break
    return found
