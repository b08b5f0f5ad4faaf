"""MachineConfig: the Fly Machines API ``config`` object, validated field by field.

Decoded as Fly's Go decoder decodes it (:mod:`hangar.model.fly`): unknown keys are ignored and
``null`` is a zero value. Fields of Fly's config that hangar cannot honour yet are refused with
a 422 naming the field when they are set to anything but their zero value.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
import signal as signal_module
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from hangar.model.duration import Duration
from hangar.model.fly import FlyModel, is_zero, refuse_unless_zero
from hangar.model.gpu_kinds import GPU_KINDS
from hangar.model.services import MachineChecks, MachineServices

UNSUPPORTED_CONFIG_FIELDS = (
    "schedule",
    "processes",
    "dns",
    "statics",
    "standbys",
    "containers",
    "volumes",
    "disable_machine_autostart",
    "size",
    "metrics",
    "rootfs",
    "cache_drive",
    "spot",
)
UNSUPPORTED_GUEST_FIELDS = ("kernel_args", "host_dedication_id", "persist_rootfs", "max_memory_mb")
UNSUPPORTED_INIT_FIELDS = ("tty", "swap_size_mb", "kernel_args")
UNSUPPORTED_RESTART_FIELDS = ("gpu_bid_price",)
UNSUPPORTED_FILE_FIELDS = ("image_config",)
UNSUPPORTED_MOUNT_FIELDS = ("extend_threshold_percent", "add_size_gb", "size_gb_limit")
MAX_MOUNTS = 8
"""Volumes one machine may mount."""

METADATA_KEY_PATTERN = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9_.\-]{0,62}$")
ENV_KEY_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SECRET_NAME_PATTERN = ENV_KEY_PATTERN
"""App secrets become environment variables, so they are named as variables are."""
MAX_FILE_BYTES = 1024 * 1024
GPU_COUNTS = (1, 2, 4, 8)
MAX_FILES = 64
DEFAULT_STOP_TIMEOUT_S = 5.0
DEFAULT_STOP_SIGNAL = int(signal_module.SIGTERM)
# The guest mounts these before it runs the process; files hangar writes stay out of them.
GUEST_PSEUDO_FILESYSTEMS = ("/proc", "/sys", "/dev")


def signal_number(name: str) -> int:
    """``SIGTERM`` / ``TERM`` / ``15`` -> 15."""
    text = name.strip().upper()
    if text.isdigit():
        number = int(text)
        if 1 <= number <= 64:
            return number
        raise ValueError(f"unknown signal {name!r}")
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return int(signal_module.Signals[text])
    except KeyError:
        raise ValueError(f"unknown signal {name!r}") from None


class InitConfig(FlyModel):
    exec: list[str] | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data: Any) -> Any:
        refuse_unless_zero(data, UNSUPPORTED_INIT_FIELDS, "config.init.")
        return data


class Tier(enum.StrEnum):
    """How a machine is isolated: a micro-VM, or a sandboxed container (gVisor) for thin
    GPU slices (a MIG instance or a time share cannot be passed into a VM)."""

    VM = "vm"
    SANDBOX = "sandbox"


GPU_SLICE_PATTERN = re.compile(r"^[1-7]g\.[0-9]{1,3}gb$")
GPU_SHARE_STEP = 1000
"""Shares are counted in thousandths of a GPU."""
MIG_COMPUTE_SLICES = 7
"""A MIG profile ``Ng.*`` holds N of a GPU's 7 compute slices (as ``hangar.scheduler.mig``
counts it)."""
GPU_PART_FIELDS = ("gpu_slice", "gpu_share", "tier")
"""hangar's guest fields beside Fly's: at their zero value (``""``, ``0``) they are unset."""


class GuestConfig(FlyModel):
    cpu_kind: Literal["shared", "performance"] = "shared"
    cpus: Annotated[int, Field(ge=1, le=64)] = 1
    memory_mb: Annotated[int, Field(ge=128, le=1024 * 1024)] = 256
    gpu_kind: str | None = None
    gpus: int | None = None
    gpu_slice: str | None = None
    """hangar: a MIG instance of ``gpu_kind`` by profile (``1g.10gb``); sandbox tier."""
    gpu_share: Annotated[float, Field(gt=0, lt=1)] | None = None
    """hangar: a time share of one ``gpu_kind`` GPU (0.25: a quarter of its compute and
    memory, through MPS); sandbox tier."""
    tier: Tier | None = None
    """hangar: ``sandbox`` runs a machine without a GPU part in the sandbox tier too; left
    out, slices and shares run there and everything else in a VM."""

    @field_validator("gpu_slice")
    @classmethod
    def _profile_shape(cls, value: str | None) -> str | None:
        if value is not None and not GPU_SLICE_PATTERN.match(value):
            raise ValueError(f"{value!r} is not a MIG profile name (like 1g.10gb or 3g.40gb)")
        return value

    @field_validator("gpu_share")
    @classmethod
    def _share_in_thousandths(cls, value: float | None) -> float | None:
        if value is not None and round(value * GPU_SHARE_STEP) < 1:
            raise ValueError(f"must be at least {1 / GPU_SHARE_STEP}")
        return value

    @property
    def gpu_part(self) -> bool:
        """A slice or share of one GPU (rather than whole GPUs)."""
        return self.gpu_slice is not None or self.gpu_share is not None

    @property
    def gpu_share_milli(self) -> int:
        """The share in thousandths of a GPU (0 without one)."""
        return round(self.gpu_share * GPU_SHARE_STEP) if self.gpu_share is not None else 0

    @property
    def gpu_part_milli(self) -> int:
        """A slice's or share's part of one GPU in thousandths (0 for whole GPUs or none): a
        MIG slice its compute slices' share, rounded down."""
        if self.gpu_slice is not None:
            return int(self.gpu_slice[0]) * GPU_SHARE_STEP // MIG_COMPUTE_SLICES
        return self.gpu_share_milli

    @property
    def effective_tier(self) -> Tier:
        if self.gpu_part or self.tier is Tier.SANDBOX:
            return Tier.SANDBOX
        return Tier.VM

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data: Any) -> Any:
        refuse_unless_zero(data, UNSUPPORTED_GUEST_FIELDS, "config.guest.")
        if not isinstance(data, dict):
            return data
        # Go's zero values: no slice, no share, the tier chosen from the GPU part
        data = {**data, **{name: None for name in GPU_PART_FIELDS if is_zero(data.get(name))}}
        gpu_part = data.get("gpu_slice") is not None or data.get("gpu_share") is not None
        if data.get("gpus") == 0 and (gpu_part or not data.get("gpu_kind")):
            data = {**data, "gpus": None}  # Go's zero value: no whole GPUs
        return data

    @field_validator("memory_mb")
    @classmethod
    def _memory_multiple_of_64(cls, value: int) -> int:
        if value % 64:
            raise ValueError("must be a multiple of 64")
        return value

    @field_validator("gpu_kind")
    @classmethod
    def _known_gpu_kind(cls, value: str | None) -> str | None:
        if value is not None and value not in {kind.name for kind in GPU_KINDS}:
            known = ", ".join(sorted(kind.name for kind in GPU_KINDS))
            raise ValueError(f"unknown GPU kind {value!r}; known kinds: {known}")
        return value

    @field_validator("gpus")
    @classmethod
    def _whole_gpu_count(cls, value: int | None) -> int | None:
        if value is not None and value not in GPU_COUNTS:
            raise ValueError(f"must be one of {', '.join(map(str, GPU_COUNTS))}")
        return value

    @model_validator(mode="after")
    def _gpu_kind_and_count(self) -> GuestConfig:
        if self.gpus and self.gpu_kind is None:
            raise ValueError("gpu_kind is required when gpus is set")
        if self.gpu_slice is not None and self.gpu_share is not None:
            raise ValueError("ask for a gpu_slice or a gpu_share, not both")
        if self.gpu_part:
            if self.gpus is not None:
                raise ValueError("gpu_slice and gpu_share are part of one GPU: leave out gpus")
            if self.gpu_kind is None:
                raise ValueError("gpu_kind is required with gpu_slice or gpu_share")
            if self.tier is Tier.VM:
                raise ValueError(
                    "a GPU slice or share runs in the sandbox tier (a MIG instance or an MPS "
                    "share cannot be passed into a VM): leave out tier or set it to sandbox"
                )
            return self
        if self.gpu_kind is not None and self.gpus is None:
            self.gpus = 1
        if self.gpus and self.cpu_kind != "performance":
            raise ValueError("cpu_kind must be 'performance' for GPU machines (gpu_kind is set)")
        return self


class RestartConfig(FlyModel):
    policy: Literal["no", "always", "on-failure"] = "on-failure"
    max_retries: Annotated[int, Field(ge=0, le=1000)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data: Any) -> Any:
        refuse_unless_zero(data, UNSUPPORTED_RESTART_FIELDS, "config.restart.")
        if isinstance(data, dict) and data.get("policy") == "":
            data = {key: value for key, value in data.items() if key != "policy"}
        return data

    @property
    def effective_max_retries(self) -> int:
        return 10 if self.max_retries is None else self.max_retries


class StopConfig(FlyModel):
    """How a machine is stopped (also the body of ``POST .../stop``)."""

    timeout: Duration | None = None
    signal: str | None = None

    @field_validator("signal", mode="before")
    @classmethod
    def _valid_signal(cls, value: object) -> object:
        if value == "":
            return None  # Go's zero value: the default signal
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str):
            signal_number(value)
        return value

    @property
    def timeout_seconds(self) -> float:
        return DEFAULT_STOP_TIMEOUT_S if self.timeout is None else self.timeout

    @property
    def signal_number(self) -> int:
        return DEFAULT_STOP_SIGNAL if self.signal is None else signal_number(self.signal)


class GuestFile(FlyModel):
    guest_path: str
    raw_value: str | None = None
    secret_name: str | None = None
    mode: int | None = None

    @field_validator("guest_path")
    @classmethod
    def _absolute_inside_guest(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must be an absolute path")
        parts = value.split("/")
        if ".." in parts or "\x00" in value:
            raise ValueError("must not contain '..' or NUL")
        if value.rstrip("/") == "":
            raise ValueError("must name a file, not /")
        normalized = "/" + "/".join(part for part in parts if part not in ("", "."))
        for mount in GUEST_PSEUDO_FILESYSTEMS:
            if normalized == mount or normalized.startswith(mount + "/"):
                raise ValueError(f"must not be under {mount}")
        return value

    @field_validator("raw_value")
    @classmethod
    def _base64_and_bounded(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("must be base64") from None
        if len(decoded) > MAX_FILE_BYTES:
            raise ValueError(f"must decode to at most {MAX_FILE_BYTES} bytes")
        return value

    @field_validator("mode")
    @classmethod
    def _valid_mode(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= 0o7777:
            raise ValueError("must be a file mode between 0 and 0o7777")
        return value

    @field_validator("secret_name")
    @classmethod
    def _secret_name(cls, value: str | None) -> str | None:
        if value is not None and not SECRET_NAME_PATTERN.match(value):
            raise ValueError(f"invalid secret name {value!r}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data: Any) -> Any:
        refuse_unless_zero(data, UNSUPPORTED_FILE_FIELDS, "config.files.")
        if isinstance(data, dict):
            # Go's zero values: no secret named, the default mode.
            zero = {"secret_name": "", "mode": 0}
            data = {k: v for k, v in data.items() if k not in zero or v != zero[k]}
        return data

    @model_validator(mode="after")
    def _value_source(self) -> GuestFile:
        if (self.raw_value is None) == (self.secret_name is None):
            raise ValueError("exactly one of raw_value and secret_name is required")
        return self


def check_mount_path(value: str) -> str:
    """A volume's mount point: an absolute directory other than ``/`` and the pseudo
    filesystems, without ``..``, printable and without spaces (init passes it through the
    shell environment)."""
    parts = value.split("/")
    if not value.startswith("/") or "\0" in value or ".." in parts or value.rstrip("/") == "":
        raise ValueError("must be an absolute directory other than / without '..'")
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        raise ValueError("must be printable, without spaces")
    normalized = "/" + "/".join(part for part in parts if part not in ("", "."))
    for mount in GUEST_PSEUDO_FILESYSTEMS:
        if normalized == mount or normalized.startswith(mount + "/"):
            raise ValueError(f"must not be under {mount}")
    return value


class MountConfig(FlyModel):
    """One of ``config.mounts``: volume ``volume`` (its id) mounted at ``path``. ``name``,
    ``encrypted`` and ``size_gb`` describe the volume as Fly's clients echo them; the
    volume's own record decides. Automatic extension is not supported."""

    volume: Annotated[str, Field(min_length=1, max_length=64)]
    path: Annotated[str, Field(min_length=2, max_length=256)]
    name: Annotated[str, Field(max_length=64)] | None = None
    encrypted: bool | None = None
    size_gb: Annotated[int, Field(ge=1)] | None = None
    extend_threshold_percent: int | None = None
    add_size_gb: int | None = None
    size_gb_limit: int | None = None

    _path = field_validator("path")(check_mount_path)

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data: Any) -> Any:
        refuse_unless_zero(data, UNSUPPORTED_MOUNT_FIELDS, "config.mounts.")
        if isinstance(data, dict):
            # Go's zero values: the volume's record decides its name and size, and no
            # automatic extension is asked for (the fields are left out, as Go leaves them).
            zero = {"name": "", "size_gb": 0}
            data = {
                k: v
                for k, v in data.items()
                if k not in UNSUPPORTED_MOUNT_FIELDS and (k not in zero or v != zero[k])
            }
        return data


class MachineConfig(FlyModel):
    image: Annotated[str, Field(min_length=1, max_length=512)]
    env: dict[str, str] = Field(default_factory=dict)
    init: InitConfig = Field(default_factory=InitConfig)
    guest: GuestConfig = Field(default_factory=GuestConfig)
    restart: RestartConfig = Field(default_factory=RestartConfig)
    auto_destroy: bool = False
    metadata: dict[str, str] = Field(default_factory=dict)
    files: Annotated[list[GuestFile], Field(max_length=MAX_FILES)] = Field(default_factory=list)
    stop_config: StopConfig = Field(default_factory=StopConfig)
    services: MachineServices = Field(default_factory=list)
    checks: MachineChecks = Field(default_factory=dict)
    mounts: Annotated[list[MountConfig], Field(max_length=MAX_MOUNTS)] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported_fields(cls, data: Any) -> Any:
        refuse_unless_zero(data, UNSUPPORTED_CONFIG_FIELDS, "config.")
        return data

    @field_validator("mounts")
    @classmethod
    def _distinct_mounts(cls, value: list[MountConfig]) -> list[MountConfig]:
        if len({mount.volume for mount in value}) != len(value):
            raise ValueError("a volume is mounted twice")
        if len({mount.path.rstrip("/") for mount in value}) != len(value):
            raise ValueError("two volumes are mounted at the same path")
        return value

    @field_validator("env")
    @classmethod
    def _valid_env(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            if not ENV_KEY_PATTERN.fullmatch(key):
                raise ValueError(f"invalid variable name {key!r}")
            if "\x00" in item:
                raise ValueError(f"value of {key} contains NUL")
        return value

    @field_validator("metadata")
    @classmethod
    def _valid_metadata(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            validate_metadata_key(key)
            if len(item) > 1024:
                raise ValueError(f"value of {key} is longer than 1024 characters")
        return value


def with_metadata_edits(
    config: MachineConfig, before: dict[str, str], current: dict[str, str]
) -> MachineConfig:
    """``config`` (asked for when the machine's metadata was ``before``) with the metadata
    edits made since (``current`` is the metadata now): a key set or removed later keeps
    that later value."""
    if current == before:
        return config
    metadata = dict(config.metadata)
    for key, value in current.items():
        if before.get(key) != value:
            metadata[key] = value
    for key in before.keys() - current.keys():
        metadata.pop(key, None)
    return config.model_copy(update={"metadata": metadata})


def validate_metadata_key(key: str) -> str:
    if not METADATA_KEY_PATTERN.fullmatch(key):
        raise ValueError(
            f"invalid metadata key {key!r}: letters, digits, '_', '.', '-', at most 63 characters"
        )
    return key
