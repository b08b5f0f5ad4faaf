"""``qemu-img`` on volume images: create, copy, resize, snapshot, inspect.

Images are qcow2 (sparse; snapshots are qcow2 internal snapshots, copy-on-write). An encrypted
image uses qcow2's built-in LUKS (``encrypt.format=luks``), its passphrase handed over as a
``secret`` object read from a file: the command line carries only that file's name. LUKS's
key stretching guards weak passwords; these passphrases are 256 random bits, so it is kept
short (``encrypt.iter-time``) and opening an image costs milliseconds, not seconds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hangar.errors import Conflict, VolumeError
from hangar.images.runner import CommandError, CommandRunner, run_command
from hangar.vmm.qemu_argv import option_value
from hangar.volumes.model import ImageInfo, SnapshotInfo

QEMU_IMG = "qemu-img"
LUKS_ITER_TIME_MS = 10
METADATA_TIMEOUT_S = 120.0
SOURCE_SECRET_ID = "src-key"
TARGET_SECRET_ID = "dst-key"
_DISK_FULL_MARKERS = ("No space left on device", "Disk quota exceeded")
# QEMU 7.2 times its LUKS key stretching by the thread's CPU time, read in whole
# milliseconds of scheduler ticks; a short first round can read as 0 ms and fail the
# create. Nothing was written: run it again.
_CPU_CLOCK_FLAKE = "Unable to get accurate CPU usage"
CPU_CLOCK_ATTEMPTS = 5
_LOCK_MARKERS = ('Failed to get "write" lock', "Failed to get shared", "Is another process using")


@dataclass(frozen=True)
class ImageAccess:
    """An image to open: its path and, when encrypted, the file holding its passphrase."""

    path: Path
    secret_file: Path | None = None

    def objects(self, secret_id: str) -> list[str]:
        if self.secret_file is None:
            return []
        return ["--object", f"secret,id={secret_id},file={option_value(self.secret_file)}"]

    def image_opts(self, secret_id: str) -> str:
        opts = f"driver=qcow2,file.driver=file,file.filename={option_value(self.path)}"
        if self.secret_file is not None:
            opts += f",encrypt.format=luks,encrypt.key-secret={secret_id}"
        return opts


def _target_options(secret_file: Path | None, secret_id: str) -> list[str]:
    if secret_file is None:
        return []
    return [
        "--object",
        f"secret,id={secret_id},file={option_value(secret_file)}",
        "-o",
        f"encrypt.format=luks,encrypt.key-secret={secret_id},encrypt.iter-time={LUKS_ITER_TIME_MS}",
    ]


class QemuImg:
    """The ``qemu-img`` commands volumes need; failures become :class:`VolumeError` (or a
    :class:`Conflict` when a running QEMU holds the image)."""

    def __init__(self, runner: CommandRunner = run_command, binary: str = QEMU_IMG) -> None:
        self._runner = runner
        self._binary = binary

    def _run(self, args: Sequence[str], *, what: str, image: Path, timeout: float | None) -> str:
        attempt = 1
        while True:
            try:
                return self._runner([self._binary, *args], timeout=timeout)
            except CommandError as error:
                if _CPU_CLOCK_FLAKE in error.stderr and attempt < CPU_CLOCK_ATTEMPTS:
                    attempt += 1
                    continue
                raise _volume_error(error, what, image) from error

    def info(self, image: Path) -> ImageInfo:
        """Size, allocation, encryption and snapshots, read without the key and without
        waiting for a QEMU that has the image open (``-U``)."""
        output = self._run(
            ["info", "-U", "--output=json", "-f", "qcow2", str(image)],
            what="read",
            image=image,
            timeout=METADATA_TIMEOUT_S,
        )
        return parse_info(json.loads(output))

    def in_use(self, image: Path) -> bool:
        """Does a running QEMU hold the image open for writing (it keeps a lock on it)?"""
        try:
            self._runner(
                [self._binary, "info", "--output=json", "-f", "qcow2", str(image)],
                timeout=METADATA_TIMEOUT_S,
            )
        except CommandError as error:
            if any(marker in error.stderr for marker in _LOCK_MARKERS):
                return True
            raise _volume_error(error, "read", image) from error
        return False

    def create(self, dest: Path, size: int, secret_file: Path | None) -> None:
        self._run(
            [
                "create",
                "-q",
                "-f",
                "qcow2",
                *_target_options(secret_file, TARGET_SECRET_ID),
                str(dest),
                str(size),
            ],
            what="create",
            image=dest,
            timeout=METADATA_TIMEOUT_S,
        )

    def convert(
        self,
        source: ImageAccess,
        dest: Path,
        dest_secret_file: Path | None,
        *,
        snapshot: str | None = None,
    ) -> None:
        """Copy ``source`` (or its internal ``snapshot``) into a new qcow2 ``dest``, sparse,
        encrypted under ``dest_secret_file``'s passphrase when given."""
        snapshot_args = ["-l", f"snapshot.name={snapshot}"] if snapshot else []
        self._run(
            [
                "convert",
                "-U",
                *source.objects(SOURCE_SECRET_ID),
                "--image-opts",
                *snapshot_args,
                source.image_opts(SOURCE_SECRET_ID),
                "-O",
                "qcow2",
                *_target_options(dest_secret_file, TARGET_SECRET_ID),
                str(dest),
            ],
            what="copy",
            image=dest,
            timeout=None,
        )

    def resize(self, image: ImageAccess, size: int) -> None:
        self._run(
            [
                "resize",
                *image.objects(SOURCE_SECRET_ID),
                "--image-opts",
                image.image_opts(SOURCE_SECRET_ID),
                str(size),
            ],
            what="resize",
            image=image.path,
            timeout=METADATA_TIMEOUT_S,
        )

    def snapshot_create(self, image: ImageAccess, name: str) -> None:
        self._snapshot(image, "-c", name)

    def snapshot_delete(self, image: ImageAccess, name: str) -> None:
        self._snapshot(image, "-d", name)

    def _snapshot(self, image: ImageAccess, flag: str, name: str) -> None:
        self._run(
            [
                "snapshot",
                *image.objects(SOURCE_SECRET_ID),
                "--image-opts",
                flag,
                name,
                image.image_opts(SOURCE_SECRET_ID),
            ],
            what="snapshot",
            image=image.path,
            timeout=METADATA_TIMEOUT_S,
        )

    def check(self, image: ImageAccess) -> dict[str, Any]:
        """``qemu-img check``'s report (``corruptions``, ``leaks``...); raises if it finds
        corruption (its exit status says so)."""
        argv = [self._binary, "check", "-U", "--output=json", *image.objects(SOURCE_SECRET_ID)]
        argv += ["--image-opts", image.image_opts(SOURCE_SECRET_ID)]
        try:
            output = self._runner(argv, timeout=METADATA_TIMEOUT_S)
        except CommandError as error:
            if error.returncode == 3:  # leaked clusters only: wasted space, no damage
                return {"leaks": True}
            raise _volume_error(error, "check", image.path) from error
        report: dict[str, Any] = json.loads(output)
        return report


def parse_info(data: dict[str, Any]) -> ImageInfo:
    specific = data.get("format-specific", {}).get("data", {})
    snapshots = [
        SnapshotInfo(
            id=str(item["name"]),
            created_at=int(item.get("date-sec", 0)) + int(item.get("date-nsec", 0)) / 1e9,
        )
        for item in data.get("snapshots", [])
    ]
    return ImageInfo(
        virtual_size=int(data["virtual-size"]),
        allocated_bytes=int(data.get("actual-size", 0)),
        encrypted=bool(data.get("encrypted")) or "encrypt" in specific,
        snapshots=snapshots,
    )


def _volume_error(error: CommandError, what: str, image: Path) -> Exception:
    """What a failed ``qemu-img`` means for the caller. Its stderr names files, never keys."""
    fields: dict[str, Any] = {"image": os.fspath(image), "stderr": error.stderr}
    if any(marker in error.stderr for marker in _LOCK_MARKERS):
        return Conflict(
            f"cannot {what} volume image {image.name}: a running machine has it open",
            **fields,
        )
    if any(marker in error.stderr for marker in _DISK_FULL_MARKERS):
        return VolumeError(
            f"cannot {what} volume image {image.name}: the host's disk is full",
            retryable=True,
            reason="host_disk_full",
            **fields,
        )
    return VolumeError(
        f"cannot {what} volume image {image.name}: {error.stderr or error.message}",
        retryable=error.returncode is None,
        **fields,
    )
