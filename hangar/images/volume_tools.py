"""The volume tools archive: what a machine with volumes needs in its initrd on top of the base.

busybox can neither make ext4 nor grow it, so the guest gets e2fsprogs' own ``mke2fs`` and
``resize2fs`` from the host, with the shared libraries ``ldd`` names for them (glibc's loader
included) at the same paths, the host's ``/etc/mke2fs.conf``, and ``guest/volumes`` as
``/bin/hangar-volumes``. It is a separate gzip'd cpio archive (cached, keyed by those files'
contents) that :func:`hangar.images.initramfs.machine_initrd` appends after the base archive
only for machines that mount volumes, so other machines boot no bigger than before.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from hangar.errors import GuestBootError
from hangar.images.cachedir import build_once
from hangar.images.cpio import NewcArchive
from hangar.images.initramfs import guest_script
from hangar.images.runner import CommandError, CommandRunner, run_command

E2FSPROGS = (Path("/usr/sbin/mke2fs"), Path("/usr/sbin/resize2fs"))
MKE2FS_CONF = Path("/etc/mke2fs.conf")
GUEST_PROGRAM_DIR = "sbin"
VOLUMES_SCRIPT = "bin/hangar-volumes"
ARCHIVE_NAME = "volume-tools.cpio.gz"


def shared_libraries(binary: Path, runner: CommandRunner = run_command) -> list[Path]:
    """The libraries (and loader) ``binary`` loads, as ``ldd`` lists them."""
    try:
        output = runner(["ldd", str(binary)])
    except CommandError as error:
        raise GuestBootError(
            f"cannot list the libraries of {binary}: {error}", binary=str(binary)
        ) from error
    found: list[Path] = []
    for line in output.splitlines():
        words = line.split()
        if "=>" in words:
            target = words[words.index("=>") + 1]
            if target.startswith("/"):
                found.append(Path(target))
            elif target == "not":
                raise GuestBootError(f"{binary} needs {words[0]}, which is not installed")
        elif words and words[0].startswith("/"):
            found.append(Path(words[0]))
    return found


def tool_files(
    binaries: Sequence[Path] = E2FSPROGS, runner: CommandRunner = run_command
) -> dict[str, Path]:
    """Archive path -> host file for the tools and everything they load."""
    files: dict[str, Path] = {}
    for binary in binaries:
        if not binary.is_file():
            raise GuestBootError(
                f"{binary} is missing: install e2fsprogs for machines with volumes",
                binary=str(binary),
            )
        files[f"{GUEST_PROGRAM_DIR}/{binary.name}"] = binary
        for library in shared_libraries(binary, runner):
            files[str(PurePosixPath(library)).lstrip("/")] = library
    if MKE2FS_CONF.is_file():
        files["etc/mke2fs.conf"] = MKE2FS_CONF
    return files


def volume_tools_archive(files: dict[str, Path]) -> NewcArchive:
    archive = NewcArchive()
    folders = sorted(
        {str(parent) for name in files for parent in PurePosixPath(name).parents} - {"."},
        key=lambda folder: folder.count("/"),
    )
    for folder in folders:
        archive.directory(folder)
    for name, source in sorted(files.items()):
        mode = 0o644 if name.startswith("etc/") else 0o755
        archive.file(name, source.read_bytes(), mode)
    archive.file(VOLUMES_SCRIPT, guest_script("volumes"), 0o755)
    return archive


def ensure_volume_tools(cache_dir: Path, runner: CommandRunner = run_command) -> Path:
    """The cached gzip'd volume tools archive (rebuilt when a tool, library or the guest
    script changes)."""
    files = tool_files(runner=runner)
    key = hashlib.sha256(hashlib.sha256(guest_script("volumes")).digest())
    for name, source in sorted(files.items()):
        key.update(name.encode() + b"\0" + hashlib.sha256(source.read_bytes()).digest())
    entry = cache_dir / "initramfs" / f"volume-tools-{key.hexdigest()[:16]}"

    def build(staged: Path) -> None:
        archive = volume_tools_archive(files)
        (staged / ARCHIVE_NAME).write_bytes(gzip.compress(archive.to_bytes(), mtime=0))

    return build_once(entry, build) / ARCHIVE_NAME
