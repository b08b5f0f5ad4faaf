"""An object with the part of the ``pynvml`` module hangar calls, answering for made-up GPUs.

NVML needs the NVIDIA driver, which test machines lack. This stands in for the module
(same function names, error codes and return shapes, bytes where pynvml returns bytes)
so :class:`PynvmlReader`'s parsing runs for real. Every call is logged, which lets tests
check that reading NVML only ever queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml as real_pynvml

from tests.devices.sysfs_fixture import GIB, HGX_H100_GPUS, HGX_H100_NVSWITCHES


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(_MESSAGES.get(value, f"NVML error {value}"))
        self.value = value


NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_GPU_IS_LOST = 15

_MESSAGES = {
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
}


@dataclass
class FakeMig:
    uuid: str
    name: str
    gpu_instance_id: int
    compute_instance_id: int
    memory_total: int


@dataclass
class FakeGpu:
    bus_id: str
    """As NVML spells it: eight-digit domain, upper case (``00000000:18:00.0``)."""
    uuid: str
    name: str
    memory_total: int
    mig_mode: tuple[int, int] | None = None
    """(current, pending); None: MIG not supported."""
    mig_slots: list[FakeMig | None] = field(default_factory=list)
    nvlinks: list[str | None] | None = None
    """Remote bus id per link (None: link inactive); None: no NVLink at all."""
    lost: bool = False
    ecc_mode: tuple[int, int] | None = (1, 1)
    """(current, pending); None: ECC not supported."""
    module_id: int | None = None
    remapped_rows: tuple[int, int, int, int] = (0, 0, 0, 0)
    """(correctable, uncorrectable, pending, failure)."""
    retired_pages_pending: int = 0
    uncorrectable_ecc: int = 0
    recovery_action: int | None = 0
    """NVML_GPU_RECOVERY_ACTION_*; None: a driver that does not know the field."""
    fabric_state: int | None = None
    """NVML_GPU_FABRIC_STATE_*; None: NOT_SUPPORTED."""


class FakePynvml:
    NVMLError = NVMLError
    NVML_ERROR_INVALID_ARGUMENT = NVML_ERROR_INVALID_ARGUMENT
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NOT_FOUND = NVML_ERROR_NOT_FOUND
    NVML_DEVICE_MIG_DISABLE = 0
    NVML_DEVICE_MIG_ENABLE = 1
    NVML_FEATURE_ENABLED = 1
    NVML_FEATURE_DISABLED = 0
    NVML_NVLINK_MAX_LINKS = 18
    NVML_SUCCESS = 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_VOLATILE_ECC = 0
    NVML_FI_DEV_GET_GPU_RECOVERY_ACTION = 230
    c_nvmlGpuFabricInfo_t = real_pynvml.c_nvmlGpuFabricInfo_t

    def __init__(
        self,
        gpus: list[FakeGpu],
        *,
        driver_version: bytes = b"550.90.07",
        init_error: int | None = None,
    ) -> None:
        self.gpus = gpus
        self.driver_version = driver_version
        self.init_error = init_error
        self.calls: list[str] = []
        self.initialised = False

    def _log(self, name: str) -> None:
        self.calls.append(name)

    def nvmlInit(self) -> None:
        self._log("nvmlInit")
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self._log("nvmlShutdown")
        self.initialised = False

    def nvmlSystemGetDriverVersion(self) -> bytes:
        self._log("nvmlSystemGetDriverVersion")
        return self.driver_version

    def nvmlDeviceGetCount(self) -> int:
        self._log("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._log("nvmlDeviceGetHandleByIndex")
        gpu = self.gpus[index]
        if gpu.lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        return gpu

    def nvmlDeviceGetPciInfo(self, handle: FakeGpu) -> Any:
        self._log("nvmlDeviceGetPciInfo")
        return SimpleNamespace(busId=handle.bus_id.encode())

    def nvmlDeviceGetUUID(self, handle: FakeGpu | FakeMig) -> str:
        self._log("nvmlDeviceGetUUID")
        return handle.uuid

    def nvmlDeviceGetName(self, handle: FakeGpu | FakeMig) -> str:
        self._log("nvmlDeviceGetName")
        return handle.name

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu | FakeMig) -> Any:
        self._log("nvmlDeviceGetMemoryInfo")
        return SimpleNamespace(total=handle.memory_total, free=handle.memory_total, used=0)

    def nvmlDeviceGetMigMode(self, handle: FakeGpu) -> list[int]:
        self._log("nvmlDeviceGetMigMode")
        if handle.mig_mode is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return list(handle.mig_mode)

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: FakeGpu) -> int:
        self._log("nvmlDeviceGetMaxMigDeviceCount")
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: FakeGpu, index: int) -> FakeMig:
        self._log("nvmlDeviceGetMigDeviceHandleByIndex")
        slot = handle.mig_slots[index] if index < len(handle.mig_slots) else None
        if slot is None:
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        return slot

    def nvmlDeviceGetGpuInstanceId(self, handle: FakeMig) -> int:
        self._log("nvmlDeviceGetGpuInstanceId")
        return handle.gpu_instance_id

    def nvmlDeviceGetComputeInstanceId(self, handle: FakeMig) -> int:
        self._log("nvmlDeviceGetComputeInstanceId")
        return handle.compute_instance_id

    def nvmlDeviceGetNvLinkState(self, handle: FakeGpu, link: int) -> int:
        self._log("nvmlDeviceGetNvLinkState")
        if handle.nvlinks is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        if link >= len(handle.nvlinks):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return self.NVML_FEATURE_ENABLED if handle.nvlinks[link] else self.NVML_FEATURE_DISABLED

    def nvmlDeviceGetNvLinkRemotePciInfo(self, handle: FakeGpu, link: int) -> Any:
        self._log("nvmlDeviceGetNvLinkRemotePciInfo")
        assert handle.nvlinks is not None
        return SimpleNamespace(busId=(handle.nvlinks[link] or "").encode())

    def nvmlDeviceGetHandleByPciBusId(self, bus_id: str) -> FakeGpu:
        self._log("nvmlDeviceGetHandleByPciBusId")
        for gpu in self.gpus:
            if gpu.bus_id.upper() == bus_id.upper():
                if gpu.lost:
                    raise NVMLError(NVML_ERROR_GPU_IS_LOST)
                return gpu
        raise NVMLError(NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetEccMode(self, handle: FakeGpu) -> list[int]:
        self._log("nvmlDeviceGetEccMode")
        if handle.ecc_mode is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return list(handle.ecc_mode)

    def nvmlDeviceGetModuleId(self, handle: FakeGpu) -> int:
        self._log("nvmlDeviceGetModuleId")
        if handle.module_id is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return handle.module_id

    def nvmlDeviceGetRemappedRows(self, handle: FakeGpu) -> tuple[int, int, int, int]:
        self._log("nvmlDeviceGetRemappedRows")
        return handle.remapped_rows

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: FakeGpu) -> int:
        self._log("nvmlDeviceGetRetiredPagesPendingStatus")
        return handle.retired_pages_pending

    def nvmlDeviceGetTotalEccErrors(self, handle: FakeGpu, error_type: int, counter: int) -> int:
        self._log("nvmlDeviceGetTotalEccErrors")
        assert (error_type, counter) == (1, 0), "uncorrected, volatile"
        return handle.uncorrectable_ecc

    def nvmlDeviceGetFieldValues(self, handle: FakeGpu, field_ids: list[int]) -> list[Any]:
        self._log("nvmlDeviceGetFieldValues")
        assert field_ids == [self.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION]
        action = handle.recovery_action
        return [
            SimpleNamespace(
                nvmlReturn=NVML_ERROR_NOT_SUPPORTED if action is None else 0,
                value=SimpleNamespace(uiVal=action or 0),
            )
        ]

    def nvmlDeviceGetGpuFabricInfo(self, handle: FakeGpu, info: Any) -> int:
        self._log("nvmlDeviceGetGpuFabricInfo")
        if handle.fabric_state is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        info._obj.state = handle.fabric_state
        return 0

    # Setters: never called by readers (tests check the call log for them).

    def nvmlDeviceSetEccMode(self, handle: FakeGpu, mode: int) -> None:
        self._log("nvmlDeviceSetEccMode")
        if handle.ecc_mode is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        handle.ecc_mode = (handle.ecc_mode[0], mode)

    def nvmlDeviceSetMigMode(self, handle: FakeGpu, mode: int) -> int:
        self._log("nvmlDeviceSetMigMode")
        if handle.mig_mode is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        handle.mig_mode = (handle.mig_mode[0], mode)
        return 0


def nvml_bus_id(bdf: str) -> str:
    """``0000:18:00.0`` as NVML writes it: ``00000000:18:00.0``."""
    return "0000" + bdf.upper()


H100_MEMORY = 81559 * 1024**2


def hgx_nvml_gpus() -> list[FakeGpu]:
    """The eight HGX GPUs, each with 18 links spread over the four NVSwitches."""
    return [
        FakeGpu(
            bus_id=nvml_bus_id(bdf),
            uuid=f"GPU-0000000{index}-1111-2222-3333-444444444444",
            name="NVIDIA H100 80GB HBM3",
            memory_total=H100_MEMORY,
            mig_mode=(0, 0),
            nvlinks=[nvml_bus_id(HGX_H100_NVSWITCHES[link % 4]) for link in range(18)],
        )
        for index, bdf in enumerate(HGX_H100_GPUS)
    ]


def mig_slices() -> list[FakeMig | None]:
    return [
        FakeMig(
            "MIG-aaaaaaaa-0000-0000-0000-000000000001",
            "NVIDIA H100 80GB HBM3 MIG 3g.40gb",
            1,
            0,
            40 * GIB,
        ),
        None,  # an empty slot NVML answers NOT_FOUND for
        FakeMig(
            "MIG-aaaaaaaa-0000-0000-0000-000000000002",
            "NVIDIA H100 80GB HBM3 MIG 1g.10gb",
            5,
            0,
            10 * GIB,
        ),
    ]
