"""The guest kernel: a configured one, or Debian's cloud kernel fetched into the cache.

Debian's kernel is fetched with ``apt-get download`` and unpacked with ``dpkg -x`` (nothing
is installed into /boot); ``depmod`` then writes the ``modules.dep`` the initramfs reads.
Layout under ``CACHE/kernels``: ``VERSION/boot/vmlinuz-VERSION``, ``VERSION/lib/modules/VERSION``
and ``debian-cloud.json`` naming the version fetched, so later calls need no apt at all.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict

from hangar.errors import GuestBootError
from hangar.images.cachedir import build_once, scratch_dir, write_atomically
from hangar.images.runner import CommandError, CommandRunner, run_command
from hangar.settings import env_name

KERNEL_ENV = env_name("guest_kernel")
MODULES_ENV = env_name("guest_modules")
DEBIAN_META_PACKAGE = "linux-image-cloud-amd64"
POINTER_NAME = "debian-cloud.json"
_KERNEL_PACKAGE = re.compile(r"\blinux-image-(\d[^\s,()]*-cloud-amd64)\b")
T = TypeVar("T")
_MISSING_LISTS_MARKERS = (
    "unable to locate package",
    "no packages found",
    "has no installation candidate",
    "can't select candidate version",
    "404",
)


class GuestKernel(BaseModel):
    model_config = ConfigDict(frozen=True)

    vmlinuz: Path
    modules_dir: Path
    version: str


class _Pointer(BaseModel):
    version: str


def ensure_kernel(
    cache_dir: Path,
    *,
    vmlinuz: Path | None = None,
    modules: Path | None = None,
    runner: CommandRunner = run_command,
) -> GuestKernel:
    """The operator's kernel (``vmlinuz``, ``$HANGAR_GUEST_KERNEL``) with its
    ``lib/modules/VERSION`` folder (``modules``, ``$HANGAR_GUEST_MODULES``, with
    ``modules.dep``), else Debian's cloud kernel."""
    if vmlinuz is not None:
        return _configured_kernel(vmlinuz, modules)
    return _debian_kernel(cache_dir / "kernels", runner)


def _configured_kernel(vmlinuz: Path, modules: Path | None) -> GuestKernel:
    if not vmlinuz.is_file():
        raise GuestBootError(f"{KERNEL_ENV}={vmlinuz} is not a file", setting=KERNEL_ENV)
    if not modules:
        raise GuestBootError(
            f"{KERNEL_ENV} is set, so {MODULES_ENV} must name its lib/modules/VERSION folder",
            setting=MODULES_ENV,
        )
    modules_dir = modules
    if not (modules_dir / "modules.dep").is_file():
        raise GuestBootError(
            f"{MODULES_ENV}={modules_dir} has no modules.dep (run depmod for it)",
            setting=MODULES_ENV,
        )
    return GuestKernel(vmlinuz=vmlinuz, modules_dir=modules_dir, version=modules_dir.name)


def _kernel_in(entry: Path, version: str) -> GuestKernel:
    return GuestKernel(
        vmlinuz=entry / "boot" / f"vmlinuz-{version}",
        modules_dir=entry / "lib" / "modules" / version,
        version=version,
    )


def _debian_kernel(kernels: Path, runner: CommandRunner) -> GuestKernel:
    pointer = kernels / POINTER_NAME
    if pointer.is_file():
        version = _Pointer.model_validate_json(pointer.read_bytes()).version
        if (kernels / version).is_dir():
            return _kernel_in(kernels / version, version)

    version = _with_package_lists(runner, lambda: _current_version(runner))
    entry = build_once(kernels / version, lambda staged: _fetch(version, staged, runner))
    write_atomically(pointer, _Pointer(version=version).model_dump_json().encode())
    return _kernel_in(entry, version)


def _with_package_lists(runner: CommandRunner, action: Callable[[], T]) -> T:
    """Run an apt action; if it fails for want of package lists, ``apt-get update`` once."""
    try:
        return action()
    except CommandError as exc:
        if not any(marker in exc.stderr.lower() for marker in _MISSING_LISTS_MARKERS):
            raise _kernel_error(exc) from exc
    try:
        runner(["apt-get", "update", "-qq"])
        return action()
    except CommandError as exc:
        raise _kernel_error(exc) from exc


def _kernel_error(exc: CommandError) -> GuestBootError:
    return GuestBootError(
        f"cannot fetch Debian's guest kernel ({exc.message}); set {KERNEL_ENV} and {MODULES_ENV}",
        argv=exc.argv,
        stderr=exc.stderr,
    )


def _current_version(runner: CommandRunner) -> str:
    shown = runner(["apt-cache", "show", "--no-all-versions", DEBIAN_META_PACKAGE])
    for line in shown.splitlines():
        if line.startswith("Depends:") and (match := _KERNEL_PACKAGE.search(line)):
            return match.group(1)
    raise CommandError(
        ["apt-cache", "show", DEBIAN_META_PACKAGE], 0, f"no package found in: {shown[:500]}"
    )


def _fetch(version: str, staged: Path, runner: CommandRunner) -> None:
    package = f"linux-image-{version}"
    with scratch_dir(staged.parent, "download") as download:
        _with_package_lists(
            runner, lambda: runner(["apt-get", "download", "-qq", package], cwd=download)
        )
        debs = sorted(download.glob(f"{package}_*.deb"))
        if not debs:
            raise GuestBootError(f"apt-get download left no {package} package", package=package)
        try:
            runner(["dpkg", "-x", debs[0], staged])
            runner(["depmod", "-b", staged, version])
        except CommandError as exc:
            raise _kernel_error(exc) from exc
    if not (staged / "boot" / f"vmlinuz-{version}").is_file():
        raise GuestBootError(f"package {package} holds no vmlinuz-{version}", package=package)
