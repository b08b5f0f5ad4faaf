from __future__ import annotations

import subprocess

from hangar.images.cpio import NewcArchive


def _cpio(*args: str, archive: bytes) -> str:
    return subprocess.run(
        ["cpio", "--quiet", *args], input=archive, check=True, capture_output=True
    ).stdout.decode()


def _sample() -> bytes:
    archive = NewcArchive()
    archive.directory("bin")
    archive.file("bin/tool", b"#!/bin/sh\necho odd-length\n", 0o755)
    archive.symlink("bin/sh", "tool")
    archive.directory("dev")
    archive.char_device("dev/console", 5, 1)
    archive.file("/empty", b"")
    return archive.to_bytes()


def test_gnu_cpio_lists_every_entry() -> None:
    assert _cpio("-t", archive=_sample()).split() == [
        "bin",
        "bin/tool",
        "bin/sh",
        "dev",
        "dev/console",
        "empty",
    ]


def _modes(verbose_listing: str) -> dict[str, str]:
    modes: dict[str, str] = {}
    for line in verbose_listing.splitlines():
        words = line.split()
        name = words[words.index("->") - 1] if "->" in words else words[-1]
        modes[name] = words[0]
    return modes


def test_entries_keep_type_mode_and_content() -> None:
    assert _modes(_cpio("-tv", archive=_sample())) == {
        "bin": "drwxr-xr-x",
        "bin/tool": "-rwxr-xr-x",
        "bin/sh": "lrwxrwxrwx",
        "dev": "drwxr-xr-x",
        "dev/console": "crw-------",
        "empty": "-rw-r--r--",
    }
    assert (
        _cpio("-i", "--to-stdout", "bin/tool", archive=_sample()) == "#!/bin/sh\necho odd-length\n"
    )


def test_archive_is_padded_to_four_bytes() -> None:
    data = _sample()
    assert len(data) % 4 == 0
    assert data.startswith(b"070701")
    assert b"TRAILER!!!" in data[-128:]
