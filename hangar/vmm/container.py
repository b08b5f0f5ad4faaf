"""What a sandbox-tier machine runs: a :class:`ContainerSpec`, and the OCI runtime bundle
(``config.json``) it becomes.

A sandbox machine has no kernel of its own: its root is a folder (the image's rootfs, from
the same cache as a VM's root disk), its process is started by an OCI runtime (gVisor's
``runsc``, or ``runc`` where the operator allows it), and the GPU part it holds, if any,
is handed to it as device nodes, read-only files and environment (``hangar.agent.slices``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

CONFIG_NAME = "config.json"
OCI_VERSION = "1.0.2"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CPU_PERIOD_US = 100_000
MAX_ARGV = 4096
MAX_ENV = 4096
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


class ContainerDevice(BaseModel):
    """A character device node the container sees (and may open) at ``path``."""

    model_config = ConfigDict(frozen=True)

    path: str
    major: int = Field(ge=0)
    minor: int = Field(ge=0)
    mode: int = 0o666

    @field_validator("path")
    @classmethod
    def _under_dev(cls, value: str) -> str:
        if not value.startswith("/dev/") or ".." in value.split("/"):
            raise ValueError(f"device {value!r} must be a path under /dev")
        return value


class ContainerMount(BaseModel):
    """A host file or folder bound into the container."""

    model_config = ConfigDict(frozen=True)

    source: Path
    destination: str
    read_only: bool = True

    @field_validator("destination")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/") or ".." in value.split("/"):
            raise ValueError(f"mount destination {value!r} must be absolute, without '..'")
        return value


class ContainerSpec(BaseModel):
    """The process a sandbox machine runs, in its root folder ``rootfs``."""

    model_config = ConfigDict(frozen=True)

    rootfs: Path
    argv: list[str] = Field(min_length=1, max_length=MAX_ARGV)
    env: dict[str, str] = Field(default_factory=dict, max_length=MAX_ENV)
    cwd: str = "/"
    uid: int = Field(default=0, ge=0)
    gid: int = Field(default=0, ge=0)
    hostname: str = "sandbox"
    devices: list[ContainerDevice] = Field(default_factory=list)
    mounts: list[ContainerMount] = Field(default_factory=list)
    gpu: bool = False
    """The container drives an NVIDIA GPU part (runsc: through its nvproxy)."""
    read_only_root: bool = False
    """The root folder is mounted read-only (a machine's root is writable)."""

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _ENV_NAME.match(name) or "\0" in text:
                raise ValueError(f"environment variable {name!r} is not a plain NAME=value")
        return value


def oci_config(
    spec: ContainerSpec, *, cpus: int, memory_mb: int, netns: Path | None = None
) -> dict[str, Any]:
    """The bundle's ``config.json`` (OCI runtime spec): namespaces of its own (network
    included: without ``netns`` the container has no interface but loopback; with it, it
    joins that network namespace, where the host put its port's other end), no capabilities
    beyond the runtime's defaults for root, its devices allowed and nothing else, its CPU and
    memory caps."""
    env = {"PATH": DEFAULT_PATH, "HOSTNAME": spec.hostname, **spec.env}
    devices = [
        {
            "path": device.path,
            "type": "c",
            "major": device.major,
            "minor": device.minor,
            "fileMode": device.mode,
            "uid": 0,
            "gid": 0,
        }
        for device in spec.devices
    ]
    allowed = [
        {"allow": True, "type": "c", "major": d.major, "minor": d.minor, "access": "rwm"}
        for d in spec.devices
    ]
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
    ]
    for mount in spec.mounts:
        options = ["rbind", "ro" if mount.read_only else "rw", "nosuid"]
        mounts.append(
            {
                "destination": mount.destination,
                "type": "bind",
                "source": str(mount.source),
                "options": options,
            }
        )
    capabilities = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
    ]
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": spec.uid, "gid": spec.gid},
            "args": list(spec.argv),
            "env": [f"{name}={value}" for name, value in env.items()],
            "cwd": spec.cwd,
            "capabilities": {key: capabilities for key in ("bounding", "effective", "permitted")},
            "noNewPrivileges": True,
        },
        "root": {"path": str(spec.rootfs), "readonly": spec.read_only_root},
        "hostname": spec.hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": [
                *({"type": kind} for kind in ("pid", "ipc", "uts", "mount")),
                {"type": "network"} if netns is None else {"type": "network", "path": str(netns)},
            ],
            "devices": devices,
            "resources": {
                "devices": [{"allow": False, "access": "rwm"}, *allowed],
                "memory": {"limit": memory_mb * 1024 * 1024},
                "cpu": {"quota": cpus * CPU_PERIOD_US, "period": CPU_PERIOD_US},
            },
            "maskedPaths": [
                "/proc/kcore",
                "/proc/keys",
                "/proc/timer_list",
                "/sys/firmware",
            ],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys"],
        },
    }


def write_bundle(
    bundle: Path, spec: ContainerSpec, *, cpus: int, memory_mb: int, netns: Path | None = None
) -> Path:
    """Write ``bundle/config.json`` for ``spec`` (atomically); return its path."""
    bundle.mkdir(parents=True, exist_ok=True)
    path = bundle / CONFIG_NAME
    partial = path.with_name(CONFIG_NAME + ".partial")
    config = oci_config(spec, cpus=cpus, memory_mb=memory_mb, netns=netns)
    partial.write_text(json.dumps(config, indent=1))
    partial.rename(path)
    return path
