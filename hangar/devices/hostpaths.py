"""Where a host's ``/sys``, ``/dev`` and ``/proc`` are: the real ones, or a fixture host's.

Device checks read all three: sysfs for the PCI tree, ``/dev`` for ``/dev/vfio`` and the
NVIDIA nodes, ``/proc`` for interrupt remapping, the NVIDIA driver's per-GPU files and who
holds a device open. A fixture host lays them out side by side (``HOST/sys``, ``HOST/dev``,
``HOST/proc``) as a real root does, so a sysfs root named ``sys`` finds its siblings.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from hangar.devices.sysfs import DEFAULT_SYSFS_ROOT, SysfsRoot


class HostPaths(BaseModel):
    """``dev`` and ``proc`` are None when the sysfs root is not a host's ``sys`` folder:
    checks that need them then report the host as not ready instead of guessing."""

    model_config = ConfigDict(frozen=True)

    sys: Path
    dev: Path | None
    proc: Path | None

    @classmethod
    def real(cls) -> HostPaths:
        return cls(sys=DEFAULT_SYSFS_ROOT, dev=Path("/dev"), proc=Path("/proc"))

    @classmethod
    def beside(cls, sysfs: SysfsRoot | Path) -> HostPaths:
        """The host whose sysfs is ``sysfs``: ``/dev`` and ``/proc`` for ``/sys``, the
        sibling folders for a fixture host's ``HOST/sys``."""
        root = sysfs.root if isinstance(sysfs, SysfsRoot) else sysfs
        if root == DEFAULT_SYSFS_ROOT:
            return cls.real()
        if root.name == "sys":
            return cls(sys=root, dev=root.parent / "dev", proc=root.parent / "proc")
        return cls(sys=root, dev=None, proc=None)
