"""GPU driver bundles: the guest kernel's NVIDIA modules and user space, on a read-only disk.

The operator points hangar at a bundle (``$HANGAR_GPU_DRIVER_BUNDLE``): a directory laid out
as below, or a ready ext4 image of one. ::

    manifest.json     {"driver_version": "550.90.07",
                       "kernel_version": "6.1.0-28-cloud-amd64",
                       "modules": ["nvidia", "nvidia_uvm", "nvidia_modeset"],
                       "libraries": "lib", "binaries": "bin", "firmware": "firmware"}
    modules/NAME.ko   one file per entry of ``modules``; the guest loads them in that order
    lib/              user-space libraries (``libraries``, relative; default ``lib``)
    bin/              tools such as nvidia-smi (``binaries``, relative; default ``bin``)
    firmware/         firmware the modules load (``firmware``; default ``firmware``), laid out
                      as under /lib/firmware: ``nvidia/<driver_version>/gsp_*.bin``

Current NVIDIA drivers boot the GPU's GSP firmware (``nvidia/<version>/gsp_*.bin``) while
probing it; without it a Hopper GPU does not initialise. So the bundle must ship the GSP
firmware of its driver version, and every firmware file a module names (``modinfo -F
firmware``, checked when ``modinfo`` can read the module). The guest's init points the
kernel's firmware search path (``firmware_class.path``) at the bundle's folder before it
loads the modules.

``kernel_version`` must equal the guest kernel's version (its ``lib/modules`` folder name):
modules built for another kernel do not load. A module the NVIDIA modules need from the
guest kernel itself is listed in ``modules`` and shipped in ``modules/`` like the others.

A directory becomes an ext4 image once per content digest, cached under
``CACHE/driver-bundles`` (an edited bundle gets a new image). hangar adds
``hangar-driver.env`` to the image: the manifest as shell assignments, which is what the
guest's init reads. A ready image is used as it is, so it must hold that file as well:
``build_driver_bundle_disk`` writes such an image from a directory.

The guest gets the image as its first extra disk (``/dev/vdb``), read-only, when its
``GuestRunConfig.driver_bundle`` is set; ``guest/init`` says what it does with it. A
machine given one GPU of an NVSwitch baseboard boots with :data:`NVLINK_OFF_KERNEL_ARG`
on its kernel command line: init then loads ``nvidia`` with ``NVreg_NvLinkDisable=1``
(alone on the board, its driver would wait for a fabric that never comes). The guest also
forwards the driver's Xid lines to the host as ``{"type": "xid", "line": ...}`` control
events (``guest/xid-events``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shlex
import shutil
import stat
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hangar.errors import GuestBootError
from hangar.images.cachedir import build_once, scratch_dir
from hangar.images.kernel import GuestKernel
from hangar.images.rootfs import make_ext4
from hangar.images.runner import CommandError, CommandRunner, run_command, stdout_bytes
from hangar.model.guest_contract import CmdlineKey
from hangar.settings import env_name

DRIVER_BUNDLE_SETTING = env_name("gpu_driver_bundle")
NVLINK_OFF_KERNEL_ARG = f"{CmdlineKey.NVLINK}=off"
GSP_FIRMWARE_GLOB = "gsp_*.bin"
MANIFEST_NAME = "manifest.json"
MODULES_DIR = "modules"
GUEST_ENV_NAME = "hangar-driver.env"
DISK_NAME = "bundle.ext4"
CACHE_FOLDER = "driver-bundles"
# Part of every content digest: a change to what hangar adds to the image rebuilds it.
DISK_LAYOUT_VERSION = b"hangar-driver-bundle-2"
EXT4_MAGIC_OFFSET = 1024 + 0x38
EXT4_MAGIC = b"\x53\xef"

_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]*")
_MODULE = re.compile(r"[A-Za-z0-9_-]+")
_RELATIVE_DIR = re.compile(r"[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*")
_DEBUGFS_TYPE = re.compile(r"\bType: (\w+)")


class DriverBundleError(GuestBootError):
    """The driver bundle is missing, malformed or built for another kernel.

    ``fields``: ``bundle`` (its path, when known) and ``reason``, one of ``not_configured``,
    ``missing``, ``no_manifest``, ``bad_manifest``, ``missing_module``, ``missing_folder``,
    ``missing_firmware``, ``kernel_mismatch``, ``not_ext4``, ``unreadable``,
    ``no_guest_env``, ``build_failed``.
    """

    code = "driver_bundle_error"


class DriverBundleManifest(BaseModel):
    """``manifest.json`` of a driver bundle."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    driver_version: str
    kernel_version: str
    modules: list[str] = Field(min_length=1)
    libraries: str = "lib"
    binaries: str = "bin"
    firmware: str = "firmware"

    @field_validator("driver_version", "kernel_version")
    @classmethod
    def _version(cls, value: str) -> str:
        if not _VERSION.fullmatch(value):
            raise ValueError("must be a version such as 550.90.07 or 6.1.0-28-cloud-amd64")
        return value

    @field_validator("modules")
    @classmethod
    def _modules(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _MODULE.fullmatch(name):
                raise ValueError(f"{name!r} is not a kernel module name")
        if len(set(value)) != len(value):
            raise ValueError("lists a module twice")
        return value

    @field_validator("libraries", "binaries", "firmware")
    @classmethod
    def _relative_dir(cls, value: str) -> str:
        if not _RELATIVE_DIR.fullmatch(value) or {".", ".."} & set(value.split("/")):
            raise ValueError("must be a relative folder inside the bundle, without '.' or '..'")
        return value

    def module_path(self, name: str) -> str:
        return f"{MODULES_DIR}/{name}.ko"

    @property
    def gsp_firmware_dir(self) -> str:
        """Where the driver looks for its GSP firmware, inside the bundle."""
        return f"{self.firmware}/nvidia/{self.driver_version}"

    def guest_env(self) -> str:
        """``hangar-driver.env``: what the guest's init sources from the bundle disk."""
        values = {
            "DRIVER_VERSION": self.driver_version,
            "DRIVER_MODULES": " ".join(self.modules),
            "DRIVER_LIBRARIES": self.libraries,
            "DRIVER_BINARIES": self.binaries,
            "DRIVER_FIRMWARE": self.firmware,
        }
        return "".join(f"{key}={shlex.quote(value)}\n" for key, value in values.items())


class _BundleTree(Protocol):
    """Read access to a bundle's files, wherever they are stored."""

    def read(self, relative: str) -> bytes | None:
        """The file's content; ``None`` if it does not exist."""
        ...

    def is_file(self, relative: str) -> bool: ...

    def is_dir(self, relative: str) -> bool: ...

    def names(self, relative: str) -> list[str]:
        """The entries of a folder; empty when it is absent."""
        ...

    def local_path(self, relative: str) -> Path | None:
        """The file on this host, when the bundle is a folder (for ``modinfo``)."""
        ...


class _DirectoryTree:
    def __init__(self, root: Path) -> None:
        self.root = root

    def read(self, relative: str) -> bytes | None:
        path = self.root / relative
        return path.read_bytes() if path.is_file() else None

    def is_file(self, relative: str) -> bool:
        return (self.root / relative).is_file()

    def is_dir(self, relative: str) -> bool:
        return (self.root / relative).is_dir()

    def names(self, relative: str) -> list[str]:
        folder = self.root / relative
        return sorted(entry.name for entry in folder.iterdir()) if folder.is_dir() else []

    def local_path(self, relative: str) -> Path | None:
        return self.root / relative


class _Ext4ImageTree:
    """An ext4 image read with ``debugfs``, without mounting it. A symlink counts as
    present: it is resolved in the guest, not here."""

    def __init__(self, image: Path, runner: CommandRunner) -> None:
        self.image = image
        self._runner = runner

    def _debugfs(self, request: str) -> str:
        try:
            return self._runner(["debugfs", "-R", request, self.image])
        except CommandError as exc:
            raise DriverBundleError(
                f"cannot read the driver bundle image {self.image}: {exc.stderr}",
                bundle=str(self.image),
                reason="unreadable",
            ) from exc

    def _type(self, relative: str) -> str | None:
        match = _DEBUGFS_TYPE.search(self._debugfs(f"stat /{relative}"))
        return match.group(1) if match else None

    def read(self, relative: str) -> bytes | None:
        if self._type(relative) != "regular":
            return None
        return stdout_bytes(self._debugfs(f"cat /{relative}"))

    def is_file(self, relative: str) -> bool:
        return self._type(relative) in ("regular", "symlink")

    def is_dir(self, relative: str) -> bool:
        return self._type(relative) in ("directory", "symlink")

    def names(self, relative: str) -> list[str]:
        if self._type(relative) != "directory":
            return []
        listing = self._debugfs(f"ls -p /{relative}")
        # ls -p prints /inode/mode/uid/gid/name/size/ per entry
        names = [line.split("/")[5] for line in listing.splitlines() if line.count("/") >= 6]
        return sorted(name for name in names if name not in (".", ".."))

    def local_path(self, relative: str) -> Path | None:
        return None


def configured_driver_bundle(configured: Path | None) -> Path:
    """The bundle ``$HANGAR_GPU_DRIVER_BUNDLE`` names; a GPU machine cannot start without one."""
    if configured is None:
        raise DriverBundleError(
            f"GPU machines need the NVIDIA driver for the guest kernel: set "
            f"{DRIVER_BUNDLE_SETTING} to a driver bundle (a folder with manifest.json, or an "
            f"ext4 image of one)",
            setting=DRIVER_BUNDLE_SETTING,
            reason="not_configured",
        )
    return configured


def is_ext4_image(path: Path) -> bool:
    with path.open("rb") as image:
        image.seek(EXT4_MAGIC_OFFSET)
        return image.read(len(EXT4_MAGIC)) == EXT4_MAGIC


def _require_ext4(path: Path) -> None:
    if not is_ext4_image(path):
        raise DriverBundleError(
            f"driver bundle {path} is a file but not an ext4 image",
            bundle=str(path),
            reason="not_ext4",
        )


def _missing(bundle: Path) -> DriverBundleError:
    return DriverBundleError(
        f"driver bundle {bundle} does not exist", bundle=str(bundle), reason="missing"
    )


def _open_tree(bundle: Path, runner: CommandRunner) -> _BundleTree:
    if bundle.is_dir():
        return _DirectoryTree(bundle)
    if bundle.is_file():
        _require_ext4(bundle)
        return _Ext4ImageTree(bundle, runner)
    raise _missing(bundle)


def _parse_manifest(bundle: Path, raw: bytes) -> DriverBundleManifest:
    try:
        return DriverBundleManifest.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        where = f"{field}: " if field else ""
        raise DriverBundleError(
            f"driver bundle {bundle}: {MANIFEST_NAME} is invalid: {where}{first['msg']}",
            bundle=str(bundle),
            reason="bad_manifest",
            field=field,
        ) from exc


def load_bundle_manifest(
    bundle: Path, *, runner: CommandRunner = run_command
) -> DriverBundleManifest:
    """Read and check a bundle (a folder or an ext4 image): its manifest, that every module it
    lists and its library and binary folders are there, and for an image its guest env file."""
    tree = _open_tree(bundle, runner)
    raw = tree.read(MANIFEST_NAME)
    if raw is None:
        raise DriverBundleError(
            f"driver bundle {bundle} has no {MANIFEST_NAME}",
            bundle=str(bundle),
            reason="no_manifest",
        )
    manifest = _parse_manifest(bundle, raw)
    for name in manifest.modules:
        if not tree.is_file(manifest.module_path(name)):
            raise DriverBundleError(
                f"driver bundle {bundle} lists module {name} but has no "
                f"{manifest.module_path(name)}",
                bundle=str(bundle),
                reason="missing_module",
                module=name,
            )
    for field, folder in (
        ("libraries", manifest.libraries),
        ("binaries", manifest.binaries),
        ("firmware", manifest.firmware),
    ):
        if not tree.is_dir(folder):
            raise DriverBundleError(
                f"driver bundle {bundle}: {field} folder {folder} does not exist",
                bundle=str(bundle),
                reason="missing_folder",
                field=field,
            )
    _check_firmware(bundle, manifest, tree, runner)
    if isinstance(tree, _Ext4ImageTree) and tree.read(GUEST_ENV_NAME) != (
        manifest.guest_env().encode()
    ):
        raise DriverBundleError(
            f"driver bundle image {bundle} lacks hangar's {GUEST_ENV_NAME} for its manifest: "
            f"point hangar at the bundle folder, or build the image with hangar",
            bundle=str(bundle),
            reason="no_guest_env",
        )
    return manifest


def _check_firmware(
    bundle: Path, manifest: DriverBundleManifest, tree: _BundleTree, runner: CommandRunner
) -> None:
    """The driver version's GSP firmware is there, and every firmware file a module names."""
    gsp = [
        name
        for name in tree.names(manifest.gsp_firmware_dir)
        if fnmatch.fnmatch(name, GSP_FIRMWARE_GLOB)
    ]
    if not gsp:
        raise DriverBundleError(
            f"driver bundle {bundle} has no GSP firmware ({manifest.gsp_firmware_dir}/"
            f"{GSP_FIRMWARE_GLOB}): NVIDIA {manifest.driver_version} loads it while probing "
            "a GPU, and a Hopper GPU does not initialise without it",
            bundle=str(bundle),
            reason="missing_firmware",
            firmware=f"{manifest.gsp_firmware_dir}/{GSP_FIRMWARE_GLOB}",
        )
    for name in manifest.modules:
        for wanted in module_firmware(tree.local_path(manifest.module_path(name)), runner):
            if not tree.is_file(f"{manifest.firmware}/{wanted}"):
                raise DriverBundleError(
                    f"driver bundle {bundle}: module {name} loads firmware {wanted}, which "
                    f"is not in {manifest.firmware}/",
                    bundle=str(bundle),
                    reason="missing_firmware",
                    module=name,
                    firmware=wanted,
                )


def module_firmware(module: Path | None, runner: CommandRunner = run_command) -> list[str]:
    """The firmware files a kernel module names (``modinfo -F firmware``); empty when
    ``modinfo`` cannot read it (then the guest's ``insmod`` says what is wrong)."""
    if module is None:
        return []
    try:
        listing = runner(["modinfo", "-F", "firmware", module])
    except CommandError:
        return []
    return [line.strip() for line in listing.splitlines() if line.strip()]


def check_bundle_for_kernel(manifest: DriverBundleManifest, kernel: GuestKernel) -> None:
    if manifest.kernel_version != kernel.version:
        raise DriverBundleError(
            f"the driver bundle (NVIDIA {manifest.driver_version}) is built for kernel "
            f"{manifest.kernel_version}, but the guest kernel is {kernel.version}",
            reason="kernel_mismatch",
            bundle_kernel_version=manifest.kernel_version,
            guest_kernel_version=kernel.version,
        )


def bundle_digest(root: Path) -> str:
    """sha256 over a folder tree: every entry's path, type and mode, file contents and
    symlink targets (symlinks are not followed)."""
    digest = hashlib.sha256(DISK_LAYOUT_VERSION)
    for folder, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted([*dirnames, *filenames]):
            path = os.path.join(folder, name)
            info = os.lstat(path)
            relative = os.path.relpath(path, root)
            digest.update(f"\0{relative}\0{info.st_mode:o}\0".encode(errors="surrogateescape"))
            if stat.S_ISLNK(info.st_mode):
                digest.update(os.fsencode(os.readlink(path)))
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as content:
                    digest.update(hashlib.file_digest(content, "sha256").digest())
    return digest.hexdigest()


def _link_or_copy(source: str, dest: str) -> None:
    """A hard link where source and copy share a filesystem (no bytes copied), else a copy."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def build_driver_bundle_disk(
    bundle_dir: Path, dest: Path, *, runner: CommandRunner = run_command
) -> DriverBundleManifest:
    """Write ``dest``, the ext4 image of the bundle folder with hangar's guest env file."""
    manifest = load_bundle_manifest(bundle_dir, runner=runner)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with scratch_dir(dest.parent, "driver-bundle") as work:
        tree = work / "tree"
        shutil.copytree(bundle_dir, tree, symlinks=True, copy_function=_link_or_copy)
        guest_env = tree / GUEST_ENV_NAME
        guest_env.unlink(missing_ok=True)  # never write through a hard link into the bundle
        guest_env.write_text(manifest.guest_env())
        try:
            make_ext4(tree, dest, runner=runner)
        except CommandError as exc:
            raise DriverBundleError(
                f"cannot build the driver bundle image of {bundle_dir}: {exc.stderr}",
                bundle=str(bundle_dir),
                reason="build_failed",
                stderr=exc.stderr,
            ) from exc
    return manifest


def ensure_driver_bundle_disk(
    bundle: Path, cache_dir: Path, *, runner: CommandRunner = run_command
) -> Path:
    """The ext4 image to attach read-only: a folder's cached image (built once per content
    digest), or a ready image file as it is."""
    if bundle.is_dir():

        def build(staged: Path) -> None:
            build_driver_bundle_disk(bundle, staged / DISK_NAME, runner=runner)

        entry = cache_dir / CACHE_FOLDER / bundle_digest(bundle)[:32]
        return build_once(entry, build) / DISK_NAME
    if bundle.is_file():
        _require_ext4(bundle)
        return bundle
    raise _missing(bundle)


def prepare_driver_bundle(
    kernel: GuestKernel,
    cache_dir: Path,
    *,
    bundle: Path | None,
    runner: CommandRunner = run_command,
) -> Path:
    """For a GPU machine: the configured bundle, checked against ``kernel``, as the disk to
    attach read-only as the guest's first extra disk (and set ``driver_bundle`` in its run
    config). Raises ``DriverBundleError`` rather than let a guest start without its driver."""
    bundle = configured_driver_bundle(bundle)
    check_bundle_for_kernel(load_bundle_manifest(bundle, runner=runner), kernel)
    return ensure_driver_bundle_disk(bundle, cache_dir, runner=runner)
