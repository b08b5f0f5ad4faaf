"""hangar's initramfs: a base archive per kernel (busybox, virtio modules, init), cached,
plus a small per-machine archive appended to a copy of it (the kernel unpacks both).

What ``guest/init`` reads (the names are the guest contract's, ``hangar.model.guest_contract``):
- ``/etc/hangar/contract.env``: the contract itself, as shell assignments;
- ``/etc/hangar/modules``: module files under ``/lib/modules``, one a line, in load order;
- ``/hangar/run.json``: the machine's ``GuestRunConfig`` (for the record);
- ``/hangar/run.env``: the same as shell assignments (``GuestRunConfig.shell_env``);
- ``/hangar/hostname``, ``/hangar/hosts``: copied to the rootfs's /etc;
- ``/hangar/files/I``: content of ``files[I]``;
- ``/bin/hangar-nvidia-nodes``: lists the NVIDIA device nodes to create (``guest/nvidia-nodes``);
- ``/bin/hangar-xid-events``: turns the driver's Xid log lines into control events
  (``guest/xid-events``).
- ``/bin/hangar-volumes`` with e2fsprogs: only in the initrd of a machine with volumes, from
  the volume tools archive (``volume_tools``) appended after the base.

A GPU machine's driver bundle comes on a disk of its own (``driver_bundle``), not in the initrd.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import shutil
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from hangar.errors import GuestBootError
from hangar.images.busybox import HOST_BUSYBOX, busybox_applets
from hangar.images.cachedir import build_once
from hangar.images.cpio import NewcArchive
from hangar.images.kernel import GuestKernel
from hangar.images.run_config import GuestRunConfig
from hangar.images.runner import CommandRunner, run_command
from hangar.model.guest_contract import InitrdPath, contract_env

GUEST_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "failover",
    "net_failover",
    "virtio_net",
)
BASE_NAME = "base.cpio.gz"
MODULE_LIST = InitrdPath.MODULE_LIST
NVIDIA_NODES = "bin/hangar-nvidia-nodes"
XID_EVENTS = "bin/hangar-xid-events"
_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


def guest_script(name: str) -> bytes:
    """A file of ``hangar/images/guest``."""
    return resources.files("hangar.images").joinpath("guest", name).read_bytes()


def init_script() -> bytes:
    return guest_script("init")


def nvidia_nodes_script() -> bytes:
    return guest_script("nvidia-nodes")


def xid_events_script() -> bytes:
    return guest_script("xid-events")


def _module_name(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    for suffix in _MODULE_SUFFIXES:
        if name.endswith(suffix):
            name = name.removesuffix(suffix)
            break
    return name.replace("-", "_")


def resolve_modules(modules_dir: Path, names: Sequence[str]) -> list[str]:
    """Paths (relative to ``modules_dir``) of ``names`` and their dependencies, in load order.

    Modules built into the kernel (``modules.builtin``) are skipped.
    """
    depends: dict[str, tuple[str, list[str]]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, deps = line.partition(":")
        depends[_module_name(path)] = (path, [_module_name(dep) for dep in deps.split()])
    builtin_file = modules_dir / "modules.builtin"
    builtin = (
        {_module_name(line) for line in builtin_file.read_text().split()}
        if builtin_file.is_file()
        else set()
    )
    ordered: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name not in depends:
            if name in builtin:
                return
            raise GuestBootError(
                f"kernel module {name} is neither in {modules_dir}/modules.dep nor built in",
                module=name,
                modules_dir=str(modules_dir),
            )
        path, deps = depends[name]
        for dep in reversed(deps):
            visit(dep)
        ordered.append(path)

    for name in names:
        visit(name.replace("-", "_"))
    return ordered


def module_bytes(path: Path) -> bytes:
    """A kernel module file's ELF image, decompressed (busybox insmod takes plain ``.ko``)."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        raise GuestBootError(f"zstd-compressed module {path} is not supported", module=str(path))
    return data


def base_archive(
    kernel: GuestKernel,
    *,
    modules: Sequence[str] = GUEST_MODULES,
    busybox: Path = HOST_BUSYBOX,
    runner: CommandRunner = run_command,
) -> NewcArchive:
    archive = NewcArchive()
    for folder in ("bin", "dev", "etc", "etc/hangar", "lib", "lib/modules", "proc", "sys"):
        archive.directory(folder)
    for folder in ("newroot", "hangar", "run"):
        archive.directory(folder, 0o700)
    archive.char_device("dev/console", 5, 1)
    archive.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in busybox_applets(busybox, runner=runner):
        if applet != "busybox":
            archive.symlink(f"bin/{applet}", "busybox")
    load_order: list[str] = []
    for relative in resolve_modules(kernel.modules_dir, modules):
        file_name = _module_name(relative) + ".ko"
        archive.file(f"lib/modules/{file_name}", module_bytes(kernel.modules_dir / relative))
        load_order.append(file_name)
    archive.file(MODULE_LIST, "".join(f"{name}\n" for name in load_order).encode())
    archive.file(InitrdPath.CONTRACT_ENV, contract_env().encode())
    archive.file(NVIDIA_NODES, nvidia_nodes_script(), 0o755)
    archive.file(XID_EVENTS, xid_events_script(), 0o755)
    archive.file("init", init_script(), 0o755)
    return archive


def ensure_base_initramfs(
    kernel: GuestKernel,
    cache_dir: Path,
    *,
    modules: Sequence[str] = GUEST_MODULES,
    busybox: Path = HOST_BUSYBOX,
    runner: CommandRunner = run_command,
) -> Path:
    """The cached gzip'd base initramfs for ``kernel`` (rebuilt when the guest scripts,
    busybox or the module list change: they are part of the cache key)."""
    key = hashlib.sha256()
    module_list = "\n".join(modules).encode()
    scripts = (init_script(), nvidia_nodes_script(), xid_events_script())
    for part in (*scripts, busybox.read_bytes(), module_list, contract_env().encode()):
        key.update(hashlib.sha256(part).digest())
    entry = cache_dir / "initramfs" / f"{kernel.version}-{key.hexdigest()[:16]}"

    def build(staged: Path) -> None:
        archive = base_archive(kernel, modules=modules, busybox=busybox, runner=runner)
        (staged / BASE_NAME).write_bytes(gzip.compress(archive.to_bytes(), mtime=0))

    return build_once(entry, build) / BASE_NAME


def machine_archive(run_config: GuestRunConfig) -> bytes:
    archive = NewcArchive()
    archive.directory("hangar", 0o700)
    archive.file(InitrdPath.RUN_JSON, run_config.model_dump_json().encode(), 0o600)
    archive.file(InitrdPath.RUN_ENV, run_config.shell_env().encode(), 0o600)
    archive.file(InitrdPath.HOSTNAME, f"{run_config.hostname}\n".encode(), 0o644)
    archive.file(InitrdPath.HOSTS, run_config.hosts_file().encode(), 0o644)
    archive.directory(InitrdPath.FILES_DIR, 0o700)
    for index, guest_file in enumerate(run_config.files):
        archive.file(f"{InitrdPath.FILES_DIR}/{index}", guest_file.content(), 0o600)
    return archive.to_bytes()


def machine_initrd(
    base_initrd: Path,
    run_config: GuestRunConfig,
    dest: Path,
    extra_archives: Sequence[Path] = (),
) -> Path:
    """``dest``: a copy of ``base_initrd``, then ``extra_archives`` (such as the volume tools,
    for a machine with volumes), then the machine's archive (uncompressed).

    Each appended archive starts on a 4-byte boundary, as the kernel requires.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with dest.open("wb") as out:
            for archive in (base_initrd, *extra_archives):
                with archive.open("rb") as part:
                    shutil.copyfileobj(part, out)
                out.write(b"\0" * (-out.tell() % 4))
            out.write(machine_archive(run_config))
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return dest
