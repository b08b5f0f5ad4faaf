"""A sandbox-tier machine's root folder, seen from the host: writing ``config.files`` into it
and resolving the image's ``User`` against its ``/etc/passwd`` and ``/etc/group``.

The tree comes from a tenant's image, so every step into it refuses symlinks: a link in the
image pointing at ``/etc`` must not make the host write its own ``/etc``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from hangar.errors import Unprocessable

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_ACCOUNT_FILE_BYTES = 1 << 20


def write_into_root(root: Path, guest_path: str, data: bytes, mode: int) -> None:
    """Write ``data`` at ``guest_path`` inside ``root``, making missing folders; a symlink
    on the way (or at the file) is refused."""
    parts = [part for part in guest_path.split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        raise Unprocessable(f"{guest_path!r} is not a file path", field="config.files")
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in parts[:-1]:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=fd)
            try:
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as error:
                raise Unprocessable(
                    f"cannot write {guest_path}: {part} in the image is not a plain folder",
                    field="config.files",
                ) from error
            os.close(fd)
            fd = next_fd
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            file_fd = os.open(parts[-1], flags, mode & 0o7777, dir_fd=fd)
        except OSError as error:
            raise Unprocessable(
                f"cannot write {guest_path}: the image has something else there",
                field="config.files",
            ) from error
        with os.fdopen(file_fd, "wb") as file:
            file.write(data)
            os.fchmod(file.fileno(), mode & 0o7777)
    finally:
        os.close(fd)


def _read_account_file(root: Path, name: str) -> str:
    """``etc/NAME`` of the tree, refusing links; empty when absent."""
    try:
        fd = os.open(root, _DIR_FLAGS)
    except OSError:
        return ""
    try:
        etc = os.open("etc", _DIR_FLAGS, dir_fd=fd)
    except OSError:
        os.close(fd)
        return ""
    os.close(fd)
    try:
        file_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=etc)
    except OSError:
        return ""
    finally:
        os.close(etc)
    with os.fdopen(file_fd, "rb") as file:
        return file.read(MAX_ACCOUNT_FILE_BYTES).decode(errors="replace")


def _lookup(text: str, name: str) -> tuple[int, int] | None:
    """(third, fourth) field of the line for ``name`` in a passwd/group file."""
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[0] == name and fields[2].isdigit():
            return int(fields[2]), int(fields[3]) if fields[3].isdigit() else 0
    return None


def resolve_user(root: Path, user: str) -> tuple[int, int]:
    """The uid and gid of an image's ``User`` (``""``, ``name``, ``uid``, ``name:group``,
    ``uid:gid``), by the tree's own account files."""
    if not user:
        return 0, 0
    name, _, group = user.partition(":")
    if name.isdigit():
        uid = int(name)
        gid = uid
        passwd = _read_account_file(root, "passwd")
        for line in passwd.splitlines():
            fields = line.split(":")
            if len(fields) >= 4 and fields[2] == name and fields[3].isdigit():
                gid = int(fields[3])
                break
    else:
        found = _lookup(_read_account_file(root, "passwd"), name)
        if found is None:
            raise Unprocessable(
                f"the image's user {name!r} is not in its /etc/passwd", field="image"
            )
        uid, gid = found
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            entry = _lookup(_read_account_file(root, "group"), group)
            if entry is None:
                raise Unprocessable(
                    f"the image's group {group!r} is not in its /etc/group", field="image"
                )
            gid = entry[0]
    return uid, gid
