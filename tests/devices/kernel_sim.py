"""A stand-in for the kernel's PCI core behind a fixture sysfs tree.

Plugged in as the :class:`SysfsWriter` of a :class:`SysfsRoot`, it records every write and
applies the ones the PCI core acts on: ``driver_override``, ``drivers/<name>/unbind``,
``drivers_probe`` and ``reset``, moving ``driver`` links as the kernel would. Faults can be
armed per function to play devices that fall off the bus or stop answering after a reset.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Literal

from hangar.errors import DeviceError
from tests.devices.sysfs_fixture import SysfsBuilder

ResetFault = Literal["vanish", "unresponsive", "unbound", "eio"]

_DEVICES = "bus/pci/devices/"
_DRIVERS = "bus/pci/drivers/"


class KernelSimulator:
    def __init__(self, builder: SysfsBuilder) -> None:
        self.builder = builder
        self.root = builder.root
        self.writes: list[tuple[str, str]] = []
        # The driver the kernel's id tables would pick for each function: what it has now.
        self.native_drivers = {
            bdf: driver
            for bdf in os.listdir(self.root / "bus/pci/devices")
            if (driver := self._driver(bdf)) is not None and driver != "vfio-pci"
        }
        self.reset_faults: dict[str, ResetFault] = {}
        self.unprobeable: set[str] = set()
        """Functions that no driver takes on ``drivers_probe`` (a driver refusing the device)."""

    def write(self, root: Path, relpath: str, data: str) -> None:
        assert root == self.root, f"write under {root}, simulator serves {self.root}"
        self.writes.append((relpath, data))
        value = data.split("\n", 1)[0]
        if relpath.startswith(_DEVICES) and relpath.endswith("/driver_override"):
            self._set_override(relpath, value)
        elif relpath.startswith(_DRIVERS) and relpath.endswith("/unbind"):
            self._unbind(relpath, data, driver=relpath.split("/")[3], bdf=value)
        elif relpath == "bus/pci/drivers_probe":
            self._probe(value)
        elif relpath.startswith(_DEVICES) and relpath.endswith("/reset"):
            self._reset(relpath, data, bdf=relpath.split("/")[3], value=value)
        else:
            (root / relpath).write_text(data)

    def writes_to(self, suffix: str) -> list[tuple[str, str]]:
        return [(path, data) for path, data in self.writes if path.endswith(suffix)]

    def _driver(self, bdf: str) -> str | None:
        link = self.root / _DEVICES / bdf / "driver"
        return Path(os.readlink(link)).name if link.is_symlink() else None

    def _set_override(self, relpath: str, value: str) -> None:
        (self.root / relpath).write_text((value or "(null)") + "\n")

    def _unbind(self, relpath: str, data: str, *, driver: str, bdf: str) -> None:
        if self._driver(bdf) != driver:
            raise _kernel_error(relpath, data, errno.ENODEV)
        self.builder.unbind(bdf)

    def _probe(self, bdf: str) -> None:
        if self._driver(bdf) is not None or bdf in self.unprobeable:
            return
        override = (self.root / _DEVICES / bdf / "driver_override").read_text().strip()
        driver = self.native_drivers.get(bdf) if override == "(null)" else override
        if driver is not None and (self.root / _DRIVERS / driver).is_dir():
            self.builder.bind(bdf, driver)

    def _reset(self, relpath: str, data: str, *, bdf: str, value: str) -> None:
        if value != "1":
            raise _kernel_error(relpath, data, errno.EINVAL)
        fault = self.reset_faults.get(bdf)
        if fault == "eio":
            raise _kernel_error(relpath, data, errno.EIO)
        if fault == "vanish":
            self.builder.remove(bdf)
        elif fault == "unresponsive":
            config = self.root / _DEVICES / bdf / "config"
            config.write_bytes(b"\xff" * len(config.read_bytes()))
        elif fault == "unbound":
            self.builder.unbind(bdf)


def _kernel_error(relpath: str, data: str, code: int) -> DeviceError:
    """What FileWriter raises when the kernel fails a write with ``code``."""
    return DeviceError(
        f"writing {data.strip()!r} to {relpath} failed: {os.strerror(code)}",
        path=relpath,
        data=data,
        errno=code,
    )
