"""The real GuestPlatform: hangar.images builds what a guest boots from; a VMM driver runs it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import shutil
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path

from hangar.agent.platform import (
    BootSecrets,
    GpuBoot,
    GuestExit,
    GuestNetwork,
    SandboxGpu,
    VmHandleData,
)
from hangar.clock import Clock, SystemClock
from hangar.devices.xid import guest_addresses
from hangar.errors import ImageError, Unprocessable
from hangar.images import initramfs, kernel
from hangar.images.driver_bundle import prepare_driver_bundle
from hangar.images.local_layout import LocalLayouts
from hangar.images.netpolicy import RegistryPolicy
from hangar.images.overlay import overlay_backing
from hangar.images.reference import ImageRef as ParsedImageRef
from hangar.images.reference import parse_image_ref
from hangar.images.root_tree import resolve_user, write_into_root
from hangar.images.rootfs import (
    GIB,
    MIB,
    CachedImage,
    ImageCache,
    ImageCacheObserver,
    ImageLimits,
    machine_tree,
)
from hangar.images.run_config import GuestFile, GuestRunConfig, GuestVolume, resolve_argv
from hangar.images.volume_tools import ensure_volume_tools
from hangar.images.workers import ImageWorkers
from hangar.model.config import Tier
from hangar.model.guest_contract import RunDir
from hangar.model.machine import ImageRef, Machine
from hangar.settings import Settings
from hangar.vmm.accel import choose_accel, gpu_accel
from hangar.vmm.channels import ChannelLimits
from hangar.vmm.container import ContainerMount, ContainerSpec
from hangar.vmm.driver import DiskSpec, Driver, VmHandle, VmSpec, VolumeDiskSpec
from hangar.vmm.errors import QmpError
from hangar.vmm.guest_exec import ExecResult, GuestProcess
from hangar.vmm.proc import PROC_ROOT, read_process
from hangar.vmm.qemu import QemuDriver
from hangar.vmm.qmp import qmp_execute
from hangar.vmm.sandbox import (
    RunscPlatform,
    SandboxDriver,
    SandboxRuntime,
    bundle_dir,
    find_shims,
    kill_shim,
    rootfs_dir,
    shim_machine,
    state_root_for,
)

log = logging.getLogger(__name__)

GPU_PLACEMENT_TIMEOUT_S = 30.0
"""How long the guest's firmware may take to give the GPUs their bus numbers."""
GPU_PLACEMENT_POLL_S = 0.1
NETWORK_FILES_DIR = "network"
"""In a sandbox machine's bundle folder: its ``/etc/resolv.conf`` and ``/etc/hosts``."""


def image_limits(settings: Settings) -> ImageLimits:
    return ImageLimits(
        max_compressed_bytes=settings.image_max_compressed_mb * MIB,
        max_unpacked_bytes=settings.image_max_unpacked_mb * MIB,
        pull_timeout_s=settings.image_pull_timeout_s,
        command_timeout_s=settings.image_command_timeout_s,
        cache_bytes=round(settings.image_cache_gb * GIB),
    )


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
        local_registries: frozenset[str] = frozenset(),
        oci_dirs: Sequence[Path] | None = None,
        image_limits: ImageLimits | None = None,
        image_workers: ImageWorkers | None = None,
        machines_dir: Path | None = None,
        image_observer: ImageCacheObserver | None = None,
        sandbox: Driver | None = None,
    ) -> None:
        """``insecure_registries``: ``host:port`` spoken to over plain HTTP;
        ``local_registries``: ``host:port`` allowed on this host's own addresses;
        ``oci_dirs``: where ``oci:`` layouts may be (default: anywhere);
        ``driver_bundle``: the GPU driver bundle; ``guest_kernel``/``guest_modules``: an
        operator's kernel instead of Debian's; ``machines_dir``: where machines' root disks
        are (their images are never evicted from the cache) (each as in
        :mod:`hangar.settings`); ``image_observer``: told of each image cache hit or miss
        (metrics); ``sandbox``: the driver of sandbox-tier machines (none: such machines fail
        to launch here)."""
        self.cache_root = cache
        self.machines_dir = machines_dir
        self.images = ImageCache(
            cache,
            policy=RegistryPolicy(local=local_registries, insecure=insecure_registries),
            layouts=LocalLayouts(oci_dirs) if oci_dirs is not None else None,
            limits=image_limits,
            workers=image_workers,
            in_use=self.images_in_use,
            observer=image_observer,
        )
        self.driver = driver
        self.clock = clock or SystemClock()
        self.insecure_registries = insecure_registries
        self.driver_bundle = driver_bundle
        self.guest_kernel = guest_kernel
        self.guest_modules = guest_modules
        self.sandbox = sandbox

    @classmethod
    def from_settings(
        cls, settings: Settings, image_observer: ImageCacheObserver | None = None
    ) -> QemuGuestPlatform:
        accel = choose_accel(forced=settings.accel, pvm_guest_kernel=settings.pvm_guest_kernel)
        channels = ChannelLimits(
            console_max_bytes=settings.console_log_max_bytes,
            rate_bytes=settings.guest_channel_rate,
            burst_bytes=max(settings.guest_channel_rate, 1024 * 1024),
        )
        return cls(
            settings.cache_dir,
            QemuDriver(accel=accel, channel_limits=channels),
            insecure_registries=settings.insecure_registries,
            driver_bundle=settings.gpu_driver_bundle,
            guest_kernel=settings.guest_kernel,
            guest_modules=settings.guest_modules,
            local_registries=settings.local_registries,
            oci_dirs=settings.allowed_oci_dirs,
            image_limits=image_limits(settings),
            image_workers=ImageWorkers(settings.image_workers, settings.image_workers_per_org),
            machines_dir=settings.machines_dir,
            image_observer=image_observer,
            sandbox=sandbox_driver(settings, channels),
        )

    def images_in_use(self) -> set[str]:
        """The images machines' root disks are overlays over (never evicted)."""
        if self.machines_dir is None or not self.machines_dir.is_dir():
            return set()
        found = set()
        for run_dir in self.machines_dir.iterdir():
            for disk in (RunDir.ROOT_DISK, RunDir.ROOT_DISK + ".partial"):
                base = overlay_backing(run_dir / disk)
                if base is not None:
                    found.add(base.parent.name.replace("-", ":", 1))
        return found

    def boot_kernel(self) -> kernel.GuestKernel:
        return kernel.ensure_kernel(
            self.cache_root, vmlinuz=self.guest_kernel, modules=self.guest_modules
        )

    # images
    async def resolve_image(self, image: str, owner: str = "") -> ImageRef:
        ref = parse_image_ref(image)
        cached = await self.images.ensure(ref, owner=owner)
        return to_model_ref(ref, cached.digest)

    def image_cached(self, image_ref: ImageRef) -> bool:
        if not image_ref.digest or self.images.lookup(image_ref.digest) is None:
            return False
        # About to boot from it: recently used images are not evicted.
        self.images.touch(image_ref.digest)
        return True

    def _cached(self, image_ref: ImageRef) -> CachedImage:
        cached = self.images.lookup(image_ref.digest)
        if cached is None:
            raise ImageError(
                f"image {image_ref.digest} is not in the cache", digest=image_ref.digest
            )
        return cached

    async def prepare_root_disk(self, image_ref: ImageRef, dest: Path) -> None:
        """A qcow2 overlay over the cached image: the machine's disk costs what it writes."""
        cached = self._cached(image_ref)
        partial = dest.with_name(dest.name + ".partial")
        await asyncio.to_thread(self.images.overlay, cached, partial)
        partial.chmod(0o600)
        partial.rename(dest)

    async def prepare_root_tree(self, image_ref: ImageRef, dest: Path) -> None:
        cached = self._cached(image_ref)
        partial = dest.with_name(dest.name + ".partial")
        if partial.exists():
            await asyncio.to_thread(shutil.rmtree, partial)
        await asyncio.to_thread(machine_tree, cached, partial)
        partial.rename(dest)

    async def prepare_initrd(
        self,
        machine: Machine,
        image_ref: ImageRef,
        dest: Path,
        secrets: BootSecrets,
        volumes: Sequence[GuestVolume] = (),
    ) -> None:
        cached = self._cached(image_ref)
        config = machine.config
        image_config = cached.config
        argv = resolve_argv(image_config, config.init.exec, config.init.entrypoint, config.init.cmd)
        run_config = GuestRunConfig(
            machine_id=machine.id,
            argv=argv,
            # As on Fly, an app's secret wins over a variable of the same name.
            env={**image_config.env, **config.env, **secrets.env},
            workdir=image_config.workdir or "/",
            user=image_config.user,
            hostname=machine.id,
            driver_bundle=bool(config.guest.gpus),
            files=[
                GuestFile(
                    guest_path=item.guest_path,
                    raw_value=(
                        base64.b64encode(secrets.files[item.secret_name]).decode()
                        if item.secret_name is not None
                        else item.raw_value or ""
                    ),
                    mode=0o644 if item.mode is None else item.mode,
                )
                for item in config.files
            ],
            volumes=list(volumes),
        )
        guest_kernel = await asyncio.to_thread(self.boot_kernel)
        base = await asyncio.to_thread(
            initramfs.ensure_base_initramfs, guest_kernel, self.cache_root
        )
        extras = []
        if volumes:
            extras.append(await asyncio.to_thread(ensure_volume_tools, self.cache_root))
        partial = dest.with_name(dest.name + ".partial")
        # The initrd holds the machine's env and files: its owner's alone from the first byte.
        partial.unlink(missing_ok=True)
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        await asyncio.to_thread(initramfs.machine_initrd, base, run_config, partial, extras)
        # Secrets among them: still its owner's alone once written.
        partial.chmod(0o600)
        partial.rename(dest)

    # the VMM
    async def vm_spec(
        self,
        machine: Machine,
        run_dir: Path,
        gpus: GpuBoot | None,
        network: GuestNetwork | None = None,
        volumes: Sequence[VolumeDiskSpec] = (),
    ) -> VmSpec:
        """The spec QEMU boots. A GPU machine gets q35 with KVM (refused under TCG: VFIO does
        not run there), the driver bundle read-only, and ``gpus``' layout and memory; a machine
        on the private network its NIC and what its init is told of it; a machine with
        volumes their disks."""
        if gpus is not None and isinstance(self.driver, QemuDriver):
            gpu_accel(self.driver.accel)
        guest_kernel = await asyncio.to_thread(self.boot_kernel)
        extra_disks = []
        if gpus is not None:
            bundle = await asyncio.to_thread(
                prepare_driver_bundle, guest_kernel, self.cache_root, bundle=self.driver_bundle
            )
            extra_disks.append(DiskSpec(path=bundle, read_only=True))
        return VmSpec.in_run_dir(
            machine_id=machine.id,
            run_dir=run_dir,
            kernel=guest_kernel.vmlinuz,
            initrd=run_dir / RunDir.INITRD,
            root_disk=run_dir / RunDir.ROOT_DISK,
            root_disk_format="qcow2",
            cpus=machine.config.guest.cpus,
            memory_mb=machine.config.guest.memory_mb,
            extra_disks=extra_disks,
            volumes=list(volumes),
            nic=network.nic if network is not None else None,
            kernel_args=[
                *(gpus.kernel_args if gpus is not None else []),
                *(network.kernel_args if network is not None else []),
            ],
            gpu_topology=gpus.topology if gpus is not None else None,
        )

    async def launch(
        self,
        machine: Machine,
        run_dir: Path,
        gpus: GpuBoot | None,
        network: GuestNetwork | None = None,
        volumes: Sequence[VolumeDiskSpec] = (),
        gpu_part: SandboxGpu | None = None,
        volume_binds: Sequence[ContainerMount] = (),
    ) -> VmHandleData:
        if machine.tier is Tier.SANDBOX:
            if gpus is not None or volumes:
                raise Unprocessable(
                    f"machine {machine.id} runs in the sandbox tier: no whole GPUs or volume "
                    "disks there (its volumes are mounted by the host)",
                    field="config.guest.tier",
                )
            sandbox = self._sandbox_driver(machine.id)
            spec = await self.sandbox_spec(machine, run_dir, gpu_part, network, volume_binds)
            return (await sandbox.launch(spec)).model_dump(mode="json")
        spec = await self.vm_spec(machine, run_dir, gpus, network, volumes)
        handle = await self.driver.launch(spec)
        return handle.model_dump(mode="json")

    def _sandbox_driver(self, machine_id: str) -> Driver:
        if self.sandbox is None:
            raise Unprocessable(
                f"machine {machine_id} runs in the sandbox tier, which this host does not offer",
                field="config.guest.tier",
            )
        return self.sandbox

    async def sandbox_spec(
        self,
        machine: Machine,
        run_dir: Path,
        gpu_part: SandboxGpu | None,
        network: GuestNetwork | None = None,
        volume_binds: Sequence[ContainerMount] = (),
    ) -> VmSpec:
        """The container a sandbox-tier machine runs: the image's process with the machine's
        environment and files, in the root folder made for this boot, with its GPU part, its
        volumes (``volume_binds``: mounted by the host) and, on the private network, its
        namespace, ``/etc/resolv.conf`` and ``/etc/hosts``."""
        cached = self._cached(machine.image_ref)
        config = machine.config
        image_config = cached.config
        rootfs = rootfs_dir(run_dir)
        argv = resolve_argv(image_config, config.init.exec, config.init.entrypoint, config.init.cmd)
        for item in config.files:
            file = GuestFile(
                guest_path=item.guest_path,
                raw_value=item.raw_value or "",
                mode=0o644 if item.mode is None else item.mode,
            )
            await asyncio.to_thread(
                write_into_root, rootfs, file.guest_path, file.content(), file.mode
            )
        uid, gid = await asyncio.to_thread(resolve_user, rootfs, image_config.user)
        part = gpu_part or SandboxGpu()
        mounts = list(part.mounts)
        if network is not None:
            mounts += await asyncio.to_thread(network_mounts, run_dir, network)
        mounts += volume_binds
        container = ContainerSpec(
            rootfs=rootfs,
            argv=argv,
            env={**image_config.env, **config.env, **part.env},
            cwd=image_config.workdir or "/",
            uid=uid,
            gid=gid,
            hostname=machine.id,
            devices=part.devices,
            mounts=mounts,
            gpu=gpu_part is not None,
        )
        return VmSpec.in_run_dir(
            machine_id=machine.id,
            run_dir=run_dir,
            kernel=None,
            initrd=None,
            root_disk=rootfs,
            cpus=config.guest.cpus,
            memory_mb=config.guest.memory_mb,
            channel_sockets=False,  # the runtime writes the container's output to the file
            container=container,
            nic=network.nic if network is not None else None,
        )

    def _driver_of(self, handle: VmHandleData) -> Driver:
        if self.sandbox is not None and handle.get("driver") == self.sandbox.name:
            return self.sandbox
        return self.driver

    def qmp_socket(self, handle: VmHandleData) -> Path | None:
        if self._driver_of(handle) is not self.driver:
            return None
        socket = handle.get("qmp_socket")
        return Path(socket) if isinstance(socket, str) else None

    async def resume(
        self,
        machine: Machine,
        run_dir: Path,
        network: GuestNetwork | None,
        snapshot: Path,
        volumes: Sequence[VolumeDiskSpec] = (),
        volume_binds: Sequence[ContainerMount] = (),
    ) -> VmHandleData:
        if machine.tier is Tier.SANDBOX:
            driver = self._sandbox_driver(machine.id)
            spec = await self.sandbox_spec(machine, run_dir, None, network, volume_binds)
        else:
            driver = self.driver
            spec = await self.vm_spec(machine, run_dir, None, network, volumes)
        handle = await driver.launch(spec.model_copy(update={"incoming_snapshot": snapshot}))
        return handle.model_dump(mode="json")

    async def suspend(self, handle: VmHandleData, snapshot: Path) -> None:
        await self._driver_of(handle).suspend(VmHandle.model_validate(handle), snapshot)

    async def exec(
        self, handle: VmHandleData, argv: Sequence[str], stdin: bytes, timeout_s: float
    ) -> ExecResult:
        return await self._driver_of(handle).exec(
            VmHandle.model_validate(handle), argv, stdin=stdin, timeout_s=timeout_s
        )

    async def processes(self, handle: VmHandleData) -> list[GuestProcess]:
        return await self._driver_of(handle).processes(VmHandle.model_validate(handle))

    async def gpu_addresses(
        self, handle: VmHandleData, device_ids: Mapping[str, str]
    ) -> dict[str, str]:
        """QMP ``query-pci`` until the firmware has given every GPU a bus (bounded)."""
        if self._driver_of(handle) is not self.driver:
            return {}
        qmp = VmHandle.model_validate(handle).qmp_socket
        deadline = self.clock.monotonic() + GPU_PLACEMENT_TIMEOUT_S
        found: dict[str, str] = {}
        while True:
            try:
                reply = await qmp_execute(qmp, "query-pci", clock=self.clock, timeout_s=5.0)
            except QmpError as error:
                log.warning("query-pci on %s failed: %s", qmp, error)
                return found
            if isinstance(reply, list):
                found = {
                    address: bdf
                    for address, bdf in guest_addresses(reply, device_ids).items()
                    if int(address.split(":")[1], 16) != 0
                }
            if len(found) >= len(device_ids) or self.clock.monotonic() >= deadline:
                return found
            await self.clock.sleep(GPU_PLACEMENT_POLL_S)

    async def alive(self, handle: VmHandleData) -> bool:
        return await self._driver_of(handle).adopt(VmHandle.model_validate(handle))

    def running(self, handle: VmHandleData) -> bool:
        return self._driver_of(handle).is_running(VmHandle.model_validate(handle))

    async def stop(self, handle: VmHandleData, timeout_s: float, signum: int) -> None:
        await self._driver_of(handle).stop(
            VmHandle.model_validate(handle), timeout_s, self.clock, signum
        )

    async def signal(self, handle: VmHandleData, signum: int) -> None:
        await self._driver_of(handle).signal(VmHandle.model_validate(handle), signum)

    async def kill(self, handle: VmHandleData) -> None:
        await self._driver_of(handle).kill(VmHandle.model_validate(handle))

    async def guest_exit(self, handle: VmHandleData) -> GuestExit:
        status = await self._driver_of(handle).status(VmHandle.model_validate(handle))
        return GuestExit(exit_code=status.exit_code, guest_error=status.error or "")

    def vmm_processes(self, machines_dir: Path) -> dict[int, str]:
        return find_machine_processes(machines_dir)

    def kill_process(self, pid: int) -> None:
        """SIGKILL a VMM; a sandbox shim with its process group (its sandbox dies with it)."""
        info = read_process(pid)
        if info is not None and shim_machine(info.cmdline) is not None:
            kill_shim(pid)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def sandbox_driver(settings: Settings, channels: ChannelLimits | None = None) -> SandboxDriver:
    """The sandbox tier's driver as the settings ask: gVisor's runsc unless the operator
    chose runc; its consoles bounded as VMs' are (``channels``)."""
    runtime = SandboxRuntime(settings.sandbox_runtime)
    if runtime is SandboxRuntime.RUNC:
        binary: Path | str = "runc"
    else:
        binary = settings.runsc if settings.runsc is not None else "runsc"
    return SandboxDriver(
        binary=binary,
        state_root=state_root_for(settings.machines_dir, runtime),
        runtime=runtime,
        platform=RunscPlatform(settings.runsc_platform),
        channel_limits=channels,
    )


def find_machine_processes(machines_dir: Path) -> dict[int, str]:
    """Live QEMU processes and sandbox shims of machines under ``machines_dir``."""
    return {**find_vmm_processes(machines_dir), **find_shims(machines_dir)}


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


def network_mounts(run_dir: Path, network: GuestNetwork) -> list[ContainerMount]:
    """A sandbox machine's network files (``/etc/resolv.conf``, ``/etc/hosts``) written for
    this boot beside its bundle and bound over the image's (which may be missing, or links),
    as Docker does; the container may change its copies."""
    folder = bundle_dir(run_dir) / NETWORK_FILES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    mounts = []
    for guest_path, text in sorted(network.etc_files.items()):
        source = folder / guest_path.strip("/").replace("/", "_")
        source.write_text(text)
        source.chmod(0o644)
        mounts.append(ContainerMount(source=source, destination=guest_path, read_only=False))
    return mounts
