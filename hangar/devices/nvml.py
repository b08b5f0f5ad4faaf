"""What the NVIDIA driver knows about its GPUs, read through NVML (nvidia-ml-py).

NVML is optional: without the driver, or without nvidia-ml-py, :class:`PynvmlReader`
returns a report that says why, and the inventory is built from sysfs alone. Only
queries are made (no MIG, ECC, clock or persistence changes), so reading is safe on any
host. MIG instances are UUIDs inside a GPU, not PCI functions: they are recorded for the
sandbox tier, never passed to VFIO.

Besides identity, each GPU's report carries what the handoff checks before reuse: ECC and
MIG modes (current and pending: a tenant stages changes that take effect at the next
reset), row remapping, retired pages, uncorrectable ECC errors, the driver's recovery
action (a GPU that needs a reset says so), the NVLink fabric state and the module id
(Fabric Manager partitions name GPUs by module id, not PCI address).

NVML sees only GPUs bound to the nvidia driver. :func:`read_nvml_gpu` is the worker
target (:mod:`hangar.devices.worker`) that reads one GPU with a deadline.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import re
from collections.abc import Callable, Iterator
from typing import Any, Literal, Protocol

from pydantic import BaseModel

from hangar.devices.pci import normalize_bdf
from hangar.errors import DeviceError

Mode = Literal["enabled", "disabled", "unsupported", "unknown"]
MigMode = Mode
EccMode = Mode
FabricState = Literal["not-supported", "not-started", "in-progress", "completed", "unknown"]

_FABRIC_STATES: dict[int, FabricState] = {
    0: "not-supported",
    1: "not-started",
    2: "in-progress",
    3: "completed",
}
_RECOVERY_ACTIONS = {
    0: "none",
    1: "gpu-reset",
    2: "node-reboot",
    3: "drain-p2p",
    4: "drain-and-reset",
}
# nvmlFieldValue ids (nvml.h): the driver's recommended recovery action.
FIELD_GPU_RECOVERY_ACTION = 230

_MIG_PROFILE = re.compile(r"\bMIG\s+(\S+)\s*$")


class MigInstance(BaseModel):
    uuid: str
    profile: str | None = None
    """The profile as NVML names the instance (``1g.18gb``, ``1c.2g.35gb``)."""
    gpu_instance_id: int | None = None
    compute_instance_id: int | None = None
    memory_total_bytes: int | None = None

    @property
    def gpu_instance_profile(self) -> str | None:
        """The GPU instance's profile (``2g.35gb`` for ``1c.2g.35gb``): what a slice asks."""
        if self.profile is None:
            return None
        return ".".join(self.profile.split(".")[-2:])


class RemappedRows(BaseModel):
    correctable: int
    uncorrectable: int
    pending: bool
    """A remapping waits for the next reset."""
    failure: bool
    """Remapping failed: the memory cannot be repaired."""


class NvmlGpu(BaseModel):
    bus_id: str
    """The PCI address in sysfs spelling, for matching with the PCI inventory."""
    uuid: str | None = None
    name: str | None = None
    memory_total_bytes: int | None = None
    mig_mode: MigMode = "unknown"
    mig_mode_pending: MigMode | None = None
    """Set when a MIG mode change waits for a GPU reset."""
    mig_instances: list[MigInstance] = []
    nvlink_peers: list[str] = []
    """PCI addresses at the far end of this GPU's active NVLinks (GPUs or NVSwitches)."""
    module_id: int | None = None
    """The baseboard slot (SXM module) the GPU sits in; None where NVML has none."""
    ecc_mode: EccMode = "unknown"
    ecc_mode_pending: EccMode = "unknown"
    remapped_rows: RemappedRows | None = None
    retired_pages_pending: bool | None = None
    uncorrectable_ecc_volatile: int | None = None
    """Uncorrected ECC errors since the driver loaded."""
    recovery_action: str | None = None
    """What the driver says the GPU needs (``none``, ``gpu-reset``, ...)."""
    fabric_state: FabricState | None = None
    """NVLink fabric registration (NVSwitch systems); None where NVML does not report it."""
    errors: list[str] = []
    """Queries that failed for this GPU, as ``query: NVML message``."""


class NvmlReport(BaseModel):
    available: bool
    reason: str | None = None
    """Why NVML could not be read, when it could not."""
    driver_version: str | None = None
    gpus: list[NvmlGpu] = []
    errors: list[str] = []
    """GPUs NVML counts but could not describe (lost from the bus, for one)."""

    def gpu_at(self, bdf: str) -> NvmlGpu | None:
        return next((gpu for gpu in self.gpus if gpu.bus_id == bdf), None)


class NvmlReader(Protocol):
    def read(self) -> NvmlReport: ...


class NoNvml:
    """A reader for hosts where NVML is not to be used; the report carries ``reason``."""

    def __init__(self, reason: str = "NVML not consulted") -> None:
        self.reason = reason

    def read(self) -> NvmlReport:
        return NvmlReport(available=False, reason=self.reason)


def _import_pynvml() -> Any:
    return importlib.import_module("pynvml")


class PynvmlReader:
    """Reads NVML through the ``pynvml`` module that nvidia-ml-py installs.

    ``load`` returns that module; tests pass one that stands in for a driver.
    """

    def __init__(self, load: Callable[[], Any] = _import_pynvml) -> None:
        self.load = load

    def read(self) -> NvmlReport:
        try:
            nvml = self.load()
        except ImportError as error:
            return NvmlReport(available=False, reason=f"nvidia-ml-py cannot be imported: {error}")
        try:
            nvml.nvmlInit()
        except Exception as error:  # NVMLError, or OSError from loading the library
            return NvmlReport(available=False, reason=f"NVML init failed: {_message(error)}")
        try:
            return _read_initialised(nvml)
        except Exception as error:  # a driver fault must not take the sysfs inventory down
            return NvmlReport(available=False, reason=f"NVML query failed: {_message(error)}")
        finally:
            # A failing shutdown of a half-initialised library leaves nothing to undo.
            with contextlib.suppress(Exception):
                nvml.nvmlShutdown()


def _read_initialised(nvml: Any) -> NvmlReport:
    gpus = []
    errors = []
    for index in range(nvml.nvmlDeviceGetCount()):
        try:
            gpus.append(_read_gpu(nvml, nvml.nvmlDeviceGetHandleByIndex(index)))
        except (nvml.NVMLError, DeviceError) as error:
            errors.append(f"GPU {index}: {_message(error)}")
    return NvmlReport(
        available=True,
        driver_version=_text(nvml.nvmlSystemGetDriverVersion()),
        gpus=gpus,
        errors=errors,
    )


def _read_gpu(nvml: Any, handle: Any) -> NvmlGpu:
    bus_id = normalize_bdf(_text(nvml.nvmlDeviceGetPciInfo(handle).busId))
    errors: list[str] = []
    queries = _Queries(nvml, errors)
    uuid = queries.ask("uuid", nvml.nvmlDeviceGetUUID, handle)
    name = queries.ask("name", nvml.nvmlDeviceGetName, handle)
    memory = queries.ask("memory", nvml.nvmlDeviceGetMemoryInfo, handle)
    current, pending = _mig_modes(nvml, handle, errors)
    instances = _mig_instances(nvml, handle, errors) if current == "enabled" else []
    ecc, ecc_pending = _ecc_modes(nvml, handle, errors)
    optional = _Queries(nvml, errors, quiet=("NVML_ERROR_NOT_SUPPORTED",))
    module_id = optional.ask("module id", nvml.nvmlDeviceGetModuleId, handle)
    rows = optional.ask("remapped rows", nvml.nvmlDeviceGetRemappedRows, handle)
    retired = optional.ask(
        "retired pages pending", nvml.nvmlDeviceGetRetiredPagesPendingStatus, handle
    )
    uncorrected = optional.ask(
        "uncorrectable ECC",
        nvml.nvmlDeviceGetTotalEccErrors,
        handle,
        getattr(nvml, "NVML_MEMORY_ERROR_TYPE_UNCORRECTED", 1),
        getattr(nvml, "NVML_VOLATILE_ECC", 0),
    )
    return NvmlGpu(
        bus_id=bus_id,
        uuid=None if uuid is None else _text(uuid),
        name=None if name is None else _text(name),
        memory_total_bytes=None if memory is None else int(memory.total),
        mig_mode=current,
        mig_mode_pending=pending if pending != current else None,
        mig_instances=instances,
        nvlink_peers=_nvlink_peers(nvml, handle),
        module_id=None if module_id is None else int(module_id),
        ecc_mode=ecc,
        ecc_mode_pending=ecc_pending,
        remapped_rows=None
        if rows is None
        else RemappedRows(
            correctable=int(rows[0]),
            uncorrectable=int(rows[1]),
            pending=bool(rows[2]),
            failure=bool(rows[3]),
        ),
        retired_pages_pending=None if retired is None else bool(retired),
        uncorrectable_ecc_volatile=None if uncorrected is None else int(uncorrected),
        recovery_action=_recovery_action(nvml, handle, errors),
        fabric_state=_fabric_state(nvml, handle, errors),
        errors=errors,
    )


class _Queries:
    """Runs one NVML query at a time, noting failures instead of raising them; ``quiet``
    error codes (NOT_SUPPORTED for features a GPU lacks) are not noted."""

    def __init__(self, nvml: Any, errors: list[str], quiet: tuple[str, ...] = ()) -> None:
        self.nvml = nvml
        self.errors = errors
        self.quiet = quiet

    def ask(self, what: str, query: Any, *args: Any) -> Any:
        try:
            return query(*args)
        except self.nvml.NVMLError as error:
            if not any(_is(self.nvml, error, code) for code in self.quiet):
                self.errors.append(f"{what}: {_message(error)}")
            return None


def _ecc_modes(nvml: Any, handle: Any, errors: list[str]) -> tuple[Mode, Mode]:
    return _modes(
        nvml.nvmlDeviceGetEccMode,
        handle,
        nvml,
        errors,
        "ecc mode",
        (getattr(nvml, "NVML_FEATURE_ENABLED", 1), getattr(nvml, "NVML_FEATURE_DISABLED", 0)),
    )


def _modes(
    query: Any, handle: Any, nvml: Any, errors: list[str], what: str, values: tuple[int, int]
) -> tuple[Mode, Mode]:
    """A (current, pending) mode pair; NOT_SUPPORTED reads as ``unsupported``."""
    try:
        current, pending = query(handle)
    except nvml.NVMLError as error:
        if _is(nvml, error, "NVML_ERROR_NOT_SUPPORTED"):
            return "unsupported", "unsupported"
        errors.append(f"{what}: {_message(error)}")
        return "unknown", "unknown"
    enabled, disabled = values

    def mode(value: int) -> Mode:
        return "enabled" if value == enabled else "disabled" if value == disabled else "unknown"

    return mode(current), mode(pending)


def _recovery_action(nvml: Any, handle: Any, errors: list[str]) -> str | None:
    """The driver's recovery action field (driver 550+); None where it is not reported."""
    field = getattr(nvml, "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", FIELD_GPU_RECOVERY_ACTION)
    try:
        [value] = nvml.nvmlDeviceGetFieldValues(handle, [field])
    except nvml.NVMLError as error:
        errors.append(f"recovery action: {_message(error)}")
        return None
    if value.nvmlReturn != getattr(nvml, "NVML_SUCCESS", 0):
        return None  # an older driver: the field is unknown to it
    action = int(value.value.uiVal)
    return _RECOVERY_ACTIONS.get(action, f"action-{action}")


def _fabric_state(nvml: Any, handle: Any, errors: list[str]) -> FabricState | None:
    structure = getattr(nvml, "c_nvmlGpuFabricInfo_t", None)
    if structure is None:
        return None
    info = structure()
    try:
        nvml.nvmlDeviceGetGpuFabricInfo(handle, ctypes.byref(info))
    except nvml.NVMLError as error:
        if not _is(nvml, error, "NVML_ERROR_NOT_SUPPORTED"):
            errors.append(f"fabric info: {_message(error)}")
        return None
    return _FABRIC_STATES.get(int(info.state), "unknown")


def _mig_modes(nvml: Any, handle: Any, errors: list[str]) -> tuple[Mode, Mode]:
    return _modes(
        nvml.nvmlDeviceGetMigMode,
        handle,
        nvml,
        errors,
        "mig mode",
        (nvml.NVML_DEVICE_MIG_ENABLE, nvml.NVML_DEVICE_MIG_DISABLE),
    )


def _mig_instances(nvml: Any, handle: Any, errors: list[str]) -> list[MigInstance]:
    queries = _Queries(nvml, errors)
    count = queries.ask("mig device count", nvml.nvmlDeviceGetMaxMigDeviceCount, handle) or 0
    instances = []
    for index in range(int(count)):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, index)
        except nvml.NVMLError as error:
            if not _is(nvml, error, "NVML_ERROR_NOT_FOUND"):  # NOT_FOUND: an empty slot
                errors.append(f"mig device {index}: {_message(error)}")
            continue
        uuid = queries.ask(f"mig device {index} uuid", nvml.nvmlDeviceGetUUID, mig)
        if uuid is None:
            continue
        name = queries.ask(f"mig device {index} name", nvml.nvmlDeviceGetName, mig)
        memory = queries.ask(f"mig device {index} memory", nvml.nvmlDeviceGetMemoryInfo, mig)
        gpu_instance = queries.ask(
            f"mig device {index} gpu instance", nvml.nvmlDeviceGetGpuInstanceId, mig
        )
        compute_instance = queries.ask(
            f"mig device {index} compute instance", nvml.nvmlDeviceGetComputeInstanceId, mig
        )
        profile = _MIG_PROFILE.search(_text(name)) if name is not None else None
        instances.append(
            MigInstance(
                uuid=_text(uuid),
                profile=profile[1] if profile else None,
                gpu_instance_id=gpu_instance,
                compute_instance_id=compute_instance,
                memory_total_bytes=None if memory is None else int(memory.total),
            )
        )
    return instances


def _nvlink_peers(nvml: Any, handle: Any) -> list[str]:
    """Far ends of active links. A GPU without NVLink answers NOT_SUPPORTED on link 0."""
    peers: set[str] = set()
    for link in range(int(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18))):
        try:
            if nvml.nvmlDeviceGetNvLinkState(handle, link) != nvml.NVML_FEATURE_ENABLED:
                continue
            remote = nvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link)
            peers.add(normalize_bdf(_text(remote.busId)))
        except nvml.NVMLError as error:
            if _is(nvml, error, "NVML_ERROR_NOT_SUPPORTED"):
                break
            continue  # INVALID_ARGUMENT: this GPU has fewer links
        except DeviceError:
            continue  # an unparsable remote address names no peer we can match
    return sorted(peers)


def load_nvml(module: str = "pynvml") -> Any:
    """The NVML module named ``module``: ``pynvml``, or a stand-in whose ``load()`` gives one."""
    loaded = importlib.import_module(module)
    factory = getattr(loaded, "load", None)
    return factory() if callable(factory) else loaded


@contextlib.contextmanager
def nvml_session(nvml: Any) -> Iterator[Any]:
    """NVML initialised for the duration; a failing init raises DeviceError."""
    try:
        nvml.nvmlInit()
    except Exception as error:  # NVMLError, or OSError from loading the library
        raise DeviceError(
            f"NVML init failed: {_message(error)}", reason="nvml_unavailable"
        ) from error
    try:
        yield nvml
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def nvml_bus_id(bdf: str) -> str:
    """``0000:18:00.0`` as NVML spells it: ``00000000:18:00.0``."""
    domain, rest = bdf.split(":", 1)
    return f"{int(domain, 16):08x}:{rest}".upper()


def gpu_handle(nvml: Any, bdf: str) -> Any:
    """NVML's handle for the GPU at ``bdf``; DeviceError when the driver does not have it."""
    try:
        return nvml.nvmlDeviceGetHandleByPciBusId(nvml_bus_id(bdf))
    except nvml.NVMLError as error:
        raise DeviceError(
            f"NVML does not see {bdf}: {_message(error)} (is it bound to the nvidia driver?)",
            bdf=bdf,
            reason="nvml_no_gpu",
        ) from error


def read_nvml_gpu(bdf: str, module: str = "pynvml") -> dict[str, Any]:
    """Worker target: one GPU's NVML report, as JSON."""
    with nvml_session(load_nvml(module)) as nvml:
        return _read_gpu(nvml, gpu_handle(nvml, bdf)).model_dump(mode="json")


def _is(nvml: Any, error: Exception, code_name: str) -> bool:
    return getattr(error, "value", None) == getattr(nvml, code_name, object())


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def _message(error: Exception) -> str:
    return str(error) or type(error).__name__
