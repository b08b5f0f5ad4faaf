"""Write cpio archives in the "newc" format the kernel unpacks as initramfs."""

from __future__ import annotations

import stat

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


class NewcArchive:
    """An in-memory newc archive; names are stored relative ("bin/sh"), mtimes are 0."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._next_inode = 1

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes = b"",
        *,
        nlink: int = 1,
        rdev: tuple[int, int] = (0, 0),
    ) -> None:
        encoded = name.lstrip("/").encode() + b"\0"
        inode = 0 if name == TRAILER else self._next_inode
        self._next_inode += 1
        fields = (inode, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)
        self._chunks += [header, encoded, _pad4(len(header) + len(encoded)), data, _pad4(len(data))]

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def to_bytes(self) -> bytes:
        """The archive with its trailer (the archive object is left unchanged)."""
        trailer = NewcArchive()
        trailer._entry(TRAILER, 0)
        return b"".join(self._chunks + trailer._chunks)
