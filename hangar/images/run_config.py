"""What the guest's init needs to run the machine's process, and how argv is chosen."""

from __future__ import annotations

import base64
import binascii
import posixpath
import shlex
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hangar.errors import Unprocessable
from hangar.images.image_config import ImageConfig
from hangar.model.config import check_mount_path

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class GuestFile(BaseModel):
    """A file written into the rootfs before the process starts (Fly's ``config.files``)."""

    model_config = ConfigDict(frozen=True)

    guest_path: str
    raw_value: str
    mode: int = 0o644

    @field_validator("guest_path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        parts = value.split("/")
        if not value.startswith("/") or "\0" in value or value.rstrip("/") == "" or ".." in parts:
            raise ValueError("guest_path must be an absolute file path without '..'")
        return value

    @field_validator("raw_value")
    @classmethod
    def _base64(cls, value: str) -> str:
        try:
            base64.b64decode(value, validate=True)
        except binascii.Error as exc:
            raise ValueError("raw_value must be base64") from exc
        return value

    def content(self) -> bytes:
        return base64.b64decode(self.raw_value)


class GuestVolume(BaseModel):
    """A volume init mounts at ``path`` before the process starts: the disk whose serial is
    ``serial``, formatted with ``fstype`` on first use (see ``guest/volumes``)."""

    model_config = ConfigDict(frozen=True)

    serial: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,19}$")
    path: str
    fstype: Literal["ext4"] = "ext4"

    _path = field_validator("path")(check_mount_path)


class GuestRunConfig(BaseModel):
    """Everything init reads from ``/hangar`` in the machine's initrd."""

    model_config = ConfigDict(frozen=True)

    machine_id: str
    argv: list[str]
    env: dict[str, str] = {}
    workdir: str = ""
    user: str = ""
    hostname: str
    hosts: list[tuple[str, str]] = []
    files: list[GuestFile] = []
    driver_bundle: bool = False
    """The GPU driver bundle is the first extra disk (see ``hangar.images.driver_bundle``)."""
    volumes: list[GuestVolume] = []
    """Mounted in order; init needs the volume tools archive in the initrd for these
    (``hangar.images.volume_tools``)."""

    @field_validator("argv")
    @classmethod
    def _argv(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("argv must not be empty")
        if any("\0" in word for word in value):
            raise ValueError("argv must not contain NUL")
        return value

    @field_validator("volumes")
    @classmethod
    def _volumes(cls, value: list[GuestVolume]) -> list[GuestVolume]:
        if len({volume.serial for volume in value}) != len(value):
            raise ValueError("a volume is mounted twice")
        if len({volume.path.rstrip("/") for volume in value}) != len(value):
            raise ValueError("two volumes are mounted at the same path")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            if not key or "=" in key or "\0" in key or "\0" in item:
                raise ValueError(f"bad environment variable {key!r}")
        return value

    def process_env(self) -> dict[str, str]:
        """The process's environment: PATH and HOSTNAME as Docker sets them, unless given."""
        return {"PATH": DEFAULT_PATH, "HOSTNAME": self.hostname, **self.env}

    def hosts_file(self) -> str:
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        if all(self.hostname not in names.split() for _, names in self.hosts):
            lines.append(f"127.0.1.1\t{self.hostname}")
        lines.extend(f"{address}\t{names}" for address, names in self.hosts)
        return "\n".join(lines) + "\n"

    def shell_env(self) -> str:
        """``/hangar/run.env``: shell assignments init sources (every value single-quoted).

        ``HANGAR_ARGV`` and ``HANGAR_ENV`` hold already-quoted word lists for ``eval set --``.
        File ``i`` of ``files`` is ``/hangar/files/i`` in the initrd. ``HANGAR_DRIVER_BUNDLE=1``
        has init load the driver bundle, which extends the process's ``HANGAR_PATH`` and
        ``HANGAR_LD_LIBRARY_PATH``. Volume ``i`` is ``HANGAR_VOLUME_i_SERIAL``, ``_PATH`` and
        ``_FSTYPE``.
        """
        env = self.process_env()
        values: dict[str, str] = {
            "HANGAR_MACHINE_ID": self.machine_id,
            "HANGAR_ARGV": shlex.join(self.argv),
            "HANGAR_ENV": shlex.join(f"{key}={value}" for key, value in env.items()),
            "HANGAR_PATH": env["PATH"],
            "HANGAR_WORKDIR": posixpath.normpath(posixpath.join("/", self.workdir)),
            "HANGAR_USER": self.user,
            "HANGAR_LD_LIBRARY_PATH": env.get("LD_LIBRARY_PATH", ""),
            "HANGAR_DRIVER_BUNDLE": "1" if self.driver_bundle else "0",
            "HANGAR_FILE_COUNT": str(len(self.files)),
        }
        for index, file in enumerate(self.files):
            values[f"HANGAR_FILE_{index}_PATH"] = file.guest_path
            values[f"HANGAR_FILE_{index}_MODE"] = format(file.mode, "o")
        values["HANGAR_VOLUME_COUNT"] = str(len(self.volumes))
        for index, volume in enumerate(self.volumes):
            values[f"HANGAR_VOLUME_{index}_SERIAL"] = volume.serial
            values[f"HANGAR_VOLUME_{index}_PATH"] = volume.path.rstrip("/")
            values[f"HANGAR_VOLUME_{index}_FSTYPE"] = volume.fstype
        return "".join(f"{key}={shlex.quote(value)}\n" for key, value in values.items())


def resolve_argv(
    image_config: ImageConfig,
    init_exec: list[str] | None = None,
    init_entrypoint: list[str] | None = None,
    init_cmd: list[str] | None = None,
) -> list[str]:
    """The process argv, by Docker's rules as Fly applies them to ``config.init``.

    ``exec`` replaces everything. An ``entrypoint`` override (``[]`` clears it) replaces
    the image's entrypoint and drops the image's cmd; a ``cmd`` override replaces the cmd.
    ``None`` means "not given" (and an empty ``exec`` too).
    """
    if init_exec:
        return list(init_exec)
    entrypoint = image_config.entrypoint if init_entrypoint is None else init_entrypoint
    if init_cmd is not None:
        cmd = init_cmd
    elif init_entrypoint is not None:
        cmd = []
    else:
        cmd = image_config.cmd
    argv = [*entrypoint, *cmd]
    if not argv:
        raise Unprocessable(
            "the image has no entrypoint or cmd; set config.init.cmd or config.init.exec",
            field="config.init",
        )
    return argv
