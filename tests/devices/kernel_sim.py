"""A stand-in for the kernel's PCI core behind a fixture sysfs tree.

Plugged in as the :class:`SysfsWriter` of a :class:`SysfsRoot`, it records every write and
applies the ones the PCI core acts on: ``driver_override``, ``drivers/<name>/unbind``,
``drivers_probe``, ``reset``, ``reset_method`` and a bridge's ``reset_subordinate``, moving
``driver`` links as the kernel would. It models the failures real hosts show:

- the nvidia driver's unbind waits, forever, while a process holds the GPU's
  ``/dev/nvidiaN`` (nvidia-persistenced, DCGM): in a test's own process that raises
  :class:`SimulatedHang`; in a device worker (:func:`write_in_worker`) it blocks until the
  worker is killed;
- a reset under a host driver (no reset_prepare/reset_done hooks) wedges the GPU: config
  space reads all-ones and the GPU is marked corrupted;
- the kernel refuses a bus reset of a function that shares its bus (``ENOTTY``);
- an FLR clears no memory; a secondary bus reset makes the GPU's firmware clear it and
  report that in BAR0 (unless it is stuck), and staged ECC/MIG/CC modes take effect on
  any reset (:class:`tests.devices.gpu_hw.Hardware`);
- faults armed per function: devices that fall off the bus or stop answering.

Its settings are saved beside the tree (:meth:`KernelSimulator.save`) so a device worker
in another process acts as the same kernel; every write is also logged there.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path
from typing import Literal

from hangar.errors import DeviceError
from tests.devices.gpu_hw import TENANT_DATA, Hardware
from tests.devices.sysfs_fixture import NVIDIA, SysfsBuilder

ResetFault = Literal["vanish", "unresponsive", "unbound", "eio"]

_DEVICES = "bus/pci/devices/"
_DRIVERS = "bus/pci/drivers/"
STATE_FILE = "kernel-sim.json"
WRITES_LOG = "kernel-writes.jsonl"
HOST_DRIVERS_THAT_CANNOT_RESET = frozenset({"nvidia", "snd_hda_intel", "mlx5_core", "igb"})

# What the GPU's firmware reports in BAR0 (as NVIDIA's gpu-admin-tools reads it).
HOPPER_BOOT = (0x200BC, 0xFF)
PRE_HOPPER_BOOT = (0x118234, 0x3FF)
MEMORY_CLEAR = 0x100B20
HOPPER_DEVICE_IDS = frozenset({0x2330, 0x2331, 0x2321, 0x2335, 0x233B})


class SimulatedHang(Exception):
    """The kernel would block this write forever; raised so a test sees hangar made it."""


class KernelSimulator:
    def __init__(self, builder: SysfsBuilder, *, in_worker: bool = False) -> None:
        self.builder = builder
        self.root = builder.root
        self.in_worker = in_worker
        self.writes: list[tuple[str, str]] = []
        # The driver the kernel's id tables would pick for each function: what it has now.
        self.native_drivers = {
            bdf: driver
            for bdf in os.listdir(self.root / "bus/pci/devices")
            if (driver := self._driver(bdf)) is not None and driver != "vfio-pci"
        }
        self.supported_resets = {
            bdf: (path.read_text().split())
            for bdf in os.listdir(self.root / "bus/pci/devices")
            if (path := self.root / _DEVICES / bdf / "reset_method").exists()
        }
        self.reset_faults: dict[str, ResetFault] = {}
        self.unprobeable: set[str] = set()
        """Functions that no driver takes on ``drivers_probe`` (a driver refusing the device)."""
        self.hardware = Hardware(builder.host) if builder.host is not None else None

    # --- state shared with device workers

    def save(self) -> None:
        """Write the settings a worker's simulator needs (call after arming faults)."""
        assert self.builder.host is not None
        state = {
            "native_drivers": self.native_drivers,
            "supported_resets": self.supported_resets,
            "reset_faults": self.reset_faults,
            "unprobeable": sorted(self.unprobeable),
            "reset_subordinate": self.builder.reset_subordinate,
        }
        (self.builder.host / STATE_FILE).write_text(json.dumps(state))

    @classmethod
    def load(cls, root: Path, *, in_worker: bool = True) -> KernelSimulator:
        state = json.loads((root.parent / STATE_FILE).read_text())
        builder = SysfsBuilder(root, reset_subordinate=state["reset_subordinate"])
        kernel = cls(builder, in_worker=in_worker)
        kernel.native_drivers = state["native_drivers"]
        kernel.supported_resets = state["supported_resets"]
        kernel.reset_faults = state["reset_faults"]
        kernel.unprobeable = set(state["unprobeable"])
        return kernel

    def logged_writes(self) -> list[tuple[str, str]]:
        """Every write made through any simulator of this host, workers' included."""
        assert self.builder.host is not None
        log = self.builder.host / WRITES_LOG
        if not log.exists():
            return []
        return [tuple(json.loads(line)) for line in log.read_text().splitlines()]  # type: ignore[misc]

    # --- the kernel

    def write(self, root: Path, relpath: str, data: str) -> None:
        assert root == self.root, f"write under {root}, simulator serves {self.root}"
        self.writes.append((relpath, data))
        if self.builder.host is not None:
            with open(self.builder.host / WRITES_LOG, "a") as log:
                log.write(json.dumps([relpath, data]) + "\n")
        value = data.split("\n", 1)[0]
        if relpath.startswith(_DEVICES) and relpath.endswith("/driver_override"):
            self._set_override(relpath, value)
        elif relpath.startswith(_DRIVERS) and relpath.endswith("/unbind"):
            self._unbind(relpath, data, driver=relpath.split("/")[3], bdf=value)
        elif relpath == "bus/pci/drivers_probe":
            self._probe(value)
        elif relpath.startswith(_DEVICES) and relpath.endswith("/reset"):
            self._reset(relpath, data, bdf=relpath.split("/")[3], value=value)
        elif relpath.startswith(_DEVICES) and relpath.endswith("/reset_method"):
            self._set_reset_method(relpath, data, bdf=relpath.split("/")[3], value=value)
        elif relpath.startswith(_DEVICES) and relpath.endswith("/reset_subordinate"):
            self._reset_subordinate(relpath, data, bridge=relpath.split("/")[3], value=value)
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
        if driver == "nvidia":
            holders = self._nvidia_holders(bdf)
            if holders:
                self._hang(f"nvidia unbind of {bdf} waits for {', '.join(holders)}")
        self.builder.unbind(bdf)

    def _probe(self, bdf: str) -> None:
        if self._driver(bdf) is not None or bdf in self.unprobeable:
            return
        override = (self.root / _DEVICES / bdf / "driver_override").read_text().strip()
        driver = self.native_drivers.get(bdf) if override == "(null)" else override
        if driver is not None and (self.root / _DRIVERS / driver).is_dir():
            self.builder.bind(bdf, driver)

    def _set_reset_method(self, relpath: str, data: str, *, bdf: str, value: str) -> None:
        wanted = value.split()
        if value == "default":
            wanted = self.supported_resets.get(bdf, [])
        if any(method not in self.supported_resets.get(bdf, []) for method in wanted):
            raise _kernel_error(relpath, data, errno.EINVAL)
        (self.root / relpath).write_text(" ".join(wanted) + "\n")

    def _reset(self, relpath: str, data: str, *, bdf: str, value: str) -> None:
        if value != "1":
            raise _kernel_error(relpath, data, errno.EINVAL)
        methods = (self.root / _DEVICES / bdf / "reset_method").read_text().split()
        if not methods:
            raise _kernel_error(relpath, data, errno.ENOTTY)
        if self._wedged_by_host_driver(bdf):
            return
        fault = self.reset_faults.get(bdf)
        if fault == "eio":
            raise _kernel_error(relpath, data, errno.EIO)
        bus = methods[0] == "bus"
        if bus and self._bus_siblings(bdf):
            raise _kernel_error(relpath, data, errno.ENOTTY)
        self._after_reset(bdf, bus=bus)
        if fault == "vanish":
            self.builder.remove(bdf)
        elif fault == "unresponsive":
            config = self.root / _DEVICES / bdf / "config"
            config.write_bytes(b"\xff" * len(config.read_bytes()))
        elif fault == "unbound":
            self.builder.unbind(bdf)

    def _reset_subordinate(self, relpath: str, data: str, *, bridge: str, value: str) -> None:
        if value != "1":
            raise _kernel_error(relpath, data, errno.EINVAL)
        below = self._below(bridge)
        if not below:
            raise _kernel_error(relpath, data, errno.ENOTTY)
        for bdf in below:
            if not self._wedged_by_host_driver(bdf):
                self._after_reset(bdf, bus=True)

    # --- effects

    def _wedged_by_host_driver(self, bdf: str) -> bool:
        """A reset under a driver without reset hooks: the driver loses the device."""
        driver = self._driver(bdf)
        if driver not in HOST_DRIVERS_THAT_CANNOT_RESET:
            return False
        config = self.root / _DEVICES / bdf / "config"
        config.write_bytes(b"\xff" * len(config.read_bytes()))
        if self.hardware is not None and self._is_gpu(bdf):
            with self.hardware.edit(bdf) as gpu:
                gpu.corrupted = f"reset while bound to {driver} (Xid 79: fallen off the bus)"
        return True

    def _after_reset(self, bdf: str, *, bus: bool) -> None:
        if self.hardware is None or not self._is_gpu(bdf):
            return
        self.hardware.apply_reset(bdf, bus=bus)
        device_id = int((self.root / _DEVICES / bdf / "device").read_text(), 16)
        boot_offset, boot_done = HOPPER_BOOT if device_id in HOPPER_DEVICE_IDS else PRE_HOPPER_BOOT
        self._bar0_write(bdf, boot_offset, boot_done)
        if bus:
            cleared = not self.hardware.gpu(bdf).memory_clear_stuck
            self._bar0_write(bdf, MEMORY_CLEAR, 1 if cleared else 0)

    def _bar0_write(self, bdf: str, offset: int, value: int) -> None:
        bar0 = self.root / _DEVICES / bdf / "resource0"
        if bar0.exists():
            with open(bar0, "r+b") as registers:
                registers.seek(offset)
                registers.write(value.to_bytes(4, "little"))

    def _is_gpu(self, bdf: str) -> bool:
        folder = self.root / _DEVICES / bdf
        vendor = int((folder / "vendor").read_text(), 16)
        return vendor == NVIDIA and int((folder / "class").read_text(), 16) >> 16 == 0x03

    def _below(self, bridge: str) -> list[str]:
        folder = str((self.root / _DEVICES / bridge).resolve()) + "/"
        return [
            bdf
            for bdf in sorted(os.listdir(self.root / _DEVICES))
            if str((self.root / _DEVICES / bdf).resolve()).startswith(folder)
        ]

    def _bus_siblings(self, bdf: str) -> list[str]:
        parent = (self.root / _DEVICES / bdf).resolve().parent
        return [
            other
            for other in os.listdir(self.root / _DEVICES)
            if other != bdf and (self.root / _DEVICES / other).resolve().parent == parent
        ]

    def _nvidia_holders(self, bdf: str) -> list[str]:
        host = self.builder.host
        if host is None:
            return []
        info = host / "proc/driver/nvidia/gpus" / bdf / "information"
        if not info.exists():
            return []
        minor = next(
            line.split(":")[1].strip()
            for line in info.read_text().splitlines()
            if line.startswith("Device Minor")
        )
        node = f"/dev/nvidia{minor}"
        holders = []
        for pid in sorted(os.listdir(host / "proc")):
            fds = host / "proc" / pid / "fd"
            if (
                pid.isdigit()
                and fds.is_dir()
                and any(os.readlink(fds / fd) == node for fd in os.listdir(fds))
            ):
                holders.append((host / "proc" / pid / "comm").read_text().strip())
        return holders

    def _hang(self, why: str) -> None:
        if not self.in_worker:
            raise SimulatedHang(why)
        threading.Event().wait()  # as the kernel does: until the process is killed


def write_in_worker(root: str, relpath: str, data: str) -> None:
    """Device worker target: the write, applied by this host's simulator."""
    KernelSimulator.load(Path(root)).write(Path(root), relpath, data)


def _kernel_error(relpath: str, data: str, code: int) -> DeviceError:
    """What FileWriter raises when the kernel fails a write with ``code``."""
    return DeviceError(
        f"writing {data.strip()!r} to {relpath} failed: {os.strerror(code)}",
        path=relpath,
        data=data,
        errno=code,
    )


def tenant_used(kernel: KernelSimulator, *bdfs: str) -> None:
    """A tenant ran on these GPUs: their memory holds its data."""
    assert kernel.hardware is not None
    for bdf in bdfs:
        with kernel.hardware.edit(bdf) as gpu:
            gpu.vram = TENANT_DATA
