"""Build a cache entry once: under a per-entry lock, into a temporary folder, renamed into place.

An entry is a folder; it exists only once complete, so readers never see half an entry.
The lock is an ``flock`` on a sibling file, so it holds across threads and processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def entry_lock(entry: Path) -> Iterator[None]:
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f".{entry.name}.lock", "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def remove_tree(path: Path) -> None:
    """``rm -rf``, also through folders an unpacked image made read-only for their owner."""

    def make_writable_and_retry(function: Callable[[str], Any], failed: str, _: Any) -> None:
        parent = os.path.dirname(failed)
        os.chmod(parent, stat.S_IMODE(os.lstat(parent).st_mode) | stat.S_IRWXU)
        if os.path.isdir(failed) and not os.path.islink(failed):
            os.chmod(failed, stat.S_IMODE(os.lstat(failed).st_mode) | stat.S_IRWXU)
            shutil.rmtree(failed, onerror=make_writable_and_retry)
        else:
            function(failed)

    if path.exists() or path.is_symlink():
        shutil.rmtree(path, onerror=make_writable_and_retry)


@contextmanager
def scratch_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A temporary folder beside the cache entries (same filesystem), removed on exit."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{prefix}-", dir=parent))
    try:
        yield path
    finally:
        remove_tree(path)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so readers see the old content or the new, never half."""
    descriptor, staged = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as staged_file:
            staged_file.write(data)
        os.replace(staged, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged)
        raise


def build_once(entry: Path, build: Callable[[Path], None]) -> Path:
    """Return ``entry``, first calling ``build(tmp)`` to fill a temporary folder if it is missing.

    ``build`` fills the folder it is given; if it raises, nothing is left behind.
    """
    if entry.is_dir():
        return entry
    with entry_lock(entry):
        if entry.is_dir():
            return entry
        with scratch_dir(entry.parent, entry.name) as work:
            staged = work / "entry"
            staged.mkdir()
            build(staged)
            staged.rename(entry)
    return entry
