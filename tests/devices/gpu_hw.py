"""The state a real GPU keeps across driver binds, for fixture hosts: what is in its memory,
its ECC/MIG/CC/PPCIe modes (current, and pending until the next reset), its health
counters. Kept in ``HOST/gpu-hw.json`` so that every process sees the same device: the
kernel simulator (which applies resets), the fake NVML (which reads and stages modes)
and device workers running either in a child process.

:class:`FakeNvmlHost` is NVML as the nvidia driver serves it on such a host: it lists only
GPUs bound to ``nvidia`` in the fixture sysfs, and reads and writes this state. Its module
function :func:`load` is what ``hangar.devices.nvml.load_nvml`` calls in a worker, with the
host's sysfs root in ``$HANGAR_TEST_SYSFS``.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.devices.fake_pynvml import FakeGpu, FakePynvml, nvml_bus_id

HW_FILE = "gpu-hw.json"
LOCK_FILE = "gpu-hw.lock"
SYSFS_ENV = "HANGAR_TEST_SYSFS"
TENANT_DATA = "tenant-data"
CLEAR = "clear"

_MODES = {"enabled": 1, "disabled": 0}
_NAMES = {0x2330: "NVIDIA H100 80GB HBM3", 0x2335: "NVIDIA H200", 0x26B9: "NVIDIA L40S"}


@dataclass
class GpuState:
    vram: str = CLEAR
    ecc: list[str] = field(default_factory=lambda: ["enabled", "enabled"])
    mig: list[str] = field(default_factory=lambda: ["disabled", "disabled"])
    cc: list[str] = field(default_factory=lambda: ["off", "off"])
    ppcie: list[str] = field(default_factory=lambda: ["off", "off"])
    corrupted: str = ""
    """Why the device is wedged (a reset under a host driver), or empty."""
    memory_clear_stuck: bool = False
    """The firmware never reports its memory clear done."""
    remapped_rows: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    retired_pages_pending: int = 0
    uncorrectable_ecc: int = 0
    recovery_action: int = 0
    fabric_state: int | None = None
    module_id: int | None = None
    resets: list[str] = field(default_factory=list)
    """``flr`` or ``sbr`` per reset, in order."""


@contextmanager
def hardware_lock(host: Path) -> Iterator[None]:
    """The fixture host's hardware state, locked (``fcntl.flock`` on ``HOST/gpu-hw.lock``)."""
    with open(host / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Hardware:
    def __init__(self, host: Path) -> None:
        self.path = host / HW_FILE

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            data: dict[str, dict[str, Any]] = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return data

    def gpu(self, bdf: str) -> GpuState:
        return GpuState(**self._load().get(bdf, {}))

    @contextmanager
    def edit(self, bdf: str) -> Iterator[GpuState]:
        """Change one GPU's state; one edit at a time across threads and processes (the
        handoffs of two groups run side by side, and vendor-tool stand-ins write here too)."""
        with hardware_lock(self.path.parent):
            data = self._load()
            state = GpuState(**data.get(bdf, {}))
            yield state
            data[bdf] = asdict(state)
            partial = self.path.with_suffix(".partial")
            partial.write_text(json.dumps(data))
            partial.replace(self.path)

    def apply_reset(self, bdf: str, *, bus: bool) -> None:
        """What a reset does to the device: staged modes take effect; only the firmware's
        clear after a secondary bus reset empties the memory."""
        with self.edit(bdf) as gpu:
            for mode in (gpu.ecc, gpu.mig, gpu.cc, gpu.ppcie):
                mode[0] = mode[1]
            if bus and not gpu.memory_clear_stuck:
                gpu.vram = CLEAR
            if gpu.remapped_rows[2]:
                gpu.remapped_rows[2] = 0  # a pending remap is applied by the reset
            gpu.resets.append("sbr" if bus else "flr")


class FakeNvmlHost(FakePynvml):
    """NVML on a fixture host: the GPUs the nvidia driver holds, their state from
    :class:`Hardware`; staged modes are written back."""

    def __init__(self, sysfs_root: Path) -> None:
        super().__init__([])
        self.sysfs_root = sysfs_root
        self.hardware = Hardware(sysfs_root.parent)

    @property  # type: ignore[override]
    def gpus(self) -> list[FakeGpu]:
        return [self._gpu(bdf) for bdf in self._nvidia_gpus()]

    @gpus.setter
    def gpus(self, value: list[FakeGpu]) -> None:
        pass  # the host's GPUs come from sysfs

    def _nvidia_gpus(self) -> list[str]:
        devices = self.sysfs_root / "bus/pci/devices"
        found = []
        for bdf in sorted(os.listdir(devices)):
            link = devices / bdf / "driver"
            is_gpu = int((devices / bdf / "class").read_text(), 16) >> 16 == 0x03
            if is_gpu and link.is_symlink() and Path(os.readlink(link)).name == "nvidia":
                found.append(bdf)
        return found

    def _gpu(self, bdf: str) -> FakeGpu:
        state = self.hardware.gpu(bdf)
        device_id = int((self.sysfs_root / "bus/pci/devices" / bdf / "device").read_text(), 16)
        return FakeGpu(
            bus_id=nvml_bus_id(bdf),
            uuid=f"GPU-{bdf.replace(':', '').replace('.', '')}-0000-4000-8000-000000000000",
            name=_NAMES.get(device_id, "NVIDIA GPU"),
            memory_total=80 * 1024**3,
            mig_mode=(_MODES[state.mig[0]], _MODES[state.mig[1]]),
            ecc_mode=(_MODES[state.ecc[0]], _MODES[state.ecc[1]]),
            module_id=state.module_id,
            remapped_rows=(
                state.remapped_rows[0],
                state.remapped_rows[1],
                state.remapped_rows[2],
                state.remapped_rows[3],
            ),
            retired_pages_pending=state.retired_pages_pending,
            uncorrectable_ecc=state.uncorrectable_ecc,
            recovery_action=state.recovery_action,
            fabric_state=state.fabric_state,
            lost=bool(state.corrupted),
        )

    def _bdf(self, handle: FakeGpu) -> str:
        return handle.bus_id[4:].lower()

    def nvmlDeviceSetEccMode(self, handle: FakeGpu, mode: int) -> None:
        super().nvmlDeviceSetEccMode(handle, mode)
        with self.hardware.edit(self._bdf(handle)) as gpu:
            gpu.ecc[1] = "enabled" if mode else "disabled"

    def nvmlDeviceSetMigMode(self, handle: FakeGpu, mode: int) -> int:
        super().nvmlDeviceSetMigMode(handle, mode)
        with self.hardware.edit(self._bdf(handle)) as gpu:
            gpu.mig[1] = "enabled" if mode else "disabled"
        return 0


def load() -> FakeNvmlHost:
    """For ``load_nvml("tests.devices.gpu_hw")`` in a device worker."""
    return FakeNvmlHost(Path(os.environ[SYSFS_ENV]))
