"""Access to a sysfs tree under a configurable root.

Every read and write hangar makes to sysfs goes through :class:`SysfsRoot`, with paths
relative to the root (``bus/pci/devices/0000:17:00.0/vendor``). Reads go to files;
writes go to a :class:`SysfsWriter`, so a test can plug in a writer that reacts to
writes the way the kernel would (binding a driver when ``drivers_probe`` is written).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from hangar.errors import DeviceError

DEFAULT_SYSFS_ROOT = Path("/sys")


class SysfsWriter(Protocol):
    def write(self, root: Path, relpath: str, data: str) -> None:
        """Write ``data`` to the attribute ``relpath`` under ``root`` in one write call."""
        ...


class FileWriter:
    """Writes attribute files directly: the kernel reacts when ``root`` is a real sysfs."""

    def write(self, root: Path, relpath: str, data: str) -> None:
        path = root / relpath
        try:
            # One unbuffered write: sysfs attributes take the whole value in a single call.
            with open(path, "wb", buffering=0) as attribute:
                attribute.write(data.encode())
        except OSError as error:
            raise DeviceError(
                f"writing {data.strip()!r} to {relpath} failed: {error.strerror or error}",
                path=relpath,
                data=data,
                errno=error.errno,
            ) from error


class ReadOnlyWriter:
    """Refuses every write: for inspection tools that must change nothing on the host."""

    def write(self, root: Path, relpath: str, data: str) -> None:
        raise DeviceError(
            f"refusing to write {data.strip()!r} to {relpath}: sysfs is opened read-only",
            path=relpath,
            data=data,
        )


class SysfsRoot:
    """A sysfs tree: ``/sys`` on a host, or a fixture tree in tests."""

    def __init__(self, root: Path = DEFAULT_SYSFS_ROOT, writer: SysfsWriter | None = None) -> None:
        self.root = root
        self.writer: SysfsWriter = writer if writer is not None else FileWriter()

    def __repr__(self) -> str:
        return f"SysfsRoot({str(self.root)!r})"

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    def exists(self, relpath: str) -> bool:
        return self.path(relpath).exists()

    def read_text(self, relpath: str) -> str | None:
        """The attribute's content without trailing whitespace; None when absent or unreadable."""
        try:
            return self.path(relpath).read_text(errors="replace").rstrip()
        except OSError:
            return None

    def read_bytes(self, relpath: str, size: int) -> bytes | None:
        """Up to ``size`` bytes from the start of a binary attribute (``config``)."""
        try:
            with open(self.path(relpath), "rb") as attribute:
                return attribute.read(size)
        except OSError:
            return None

    def link_name(self, relpath: str) -> str | None:
        """The last component of a symlink's target (``driver`` -> ``nvidia``); None if no link."""
        try:
            target = os.readlink(self.path(relpath))
        except OSError:
            return None
        return Path(target).name

    def list_dir(self, relpath: str) -> list[str]:
        """Sorted entry names; empty when the directory is absent."""
        try:
            return sorted(os.listdir(self.path(relpath)))
        except OSError:
            return []

    def real_relpath(self, relpath: str) -> str:
        """Where ``relpath`` leads after resolving symlinks, relative to the root."""
        real = os.path.realpath(self.path(relpath))
        return os.path.relpath(real, os.path.realpath(self.root))

    def write(self, relpath: str, data: str) -> None:
        self.writer.write(self.root, relpath, data)


def write_attribute(root: str, relpath: str, data: str) -> None:
    """Device worker target (:mod:`hangar.devices.worker`): one write, as FileWriter makes it."""
    FileWriter().write(Path(root), relpath, data)
