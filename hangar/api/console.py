"""``GET .../logs``: a machine's console, streamed from its files in chunks, never read whole.

The console is kept in two rotated halves (:mod:`hangar.vmm.channels`); a read streams the
older half then the current one, :data:`CHUNK` bytes at a time. ``follow`` goes on with what
the guest writes next (across rotations) and ends when the machine no longer runs and has
nothing pending, or after ``follow_max_s``; a machine has at most
:data:`MAX_FOLLOWERS` followers at a time (429 past them).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from hangar.clock import Clock
from hangar.errors import RateLimited
from hangar.vmm.channels import previous_console_log

CHUNK = 64 * 1024
POLL_S = 0.2
MAX_FOLLOWERS = 8
DEFAULT_FOLLOW_MAX_S = 3600.0


class FollowerSlot:
    """One follower's place; released once, whichever way the stream ends."""

    def __init__(self, readers: ConsoleReaders, machine_id: str) -> None:
        self._readers = readers
        self._machine_id = machine_id
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._readers.release(self._machine_id)


class ConsoleReaders:
    def __init__(
        self,
        clock: Clock,
        follow_max_s: float = DEFAULT_FOLLOW_MAX_S,
        max_followers: int = MAX_FOLLOWERS,
    ) -> None:
        self._clock = clock
        self.follow_max_s = follow_max_s
        self.max_followers = max_followers
        self._followers: dict[str, int] = {}

    def followers(self, machine_id: str) -> int:
        return self._followers.get(machine_id, 0)

    def take(self, machine_id: str) -> FollowerSlot:
        """A follower's place, or 429 if the machine has all it may have."""
        if self.followers(machine_id) >= self.max_followers:
            raise RateLimited(
                f"machine {machine_id} already has {self.max_followers} log followers",
                retry_after_s=POLL_S * 25,
                action="machine_logs",
            )
        self._followers[machine_id] = self.followers(machine_id) + 1
        return FollowerSlot(self, machine_id)

    def release(self, machine_id: str) -> None:
        left = self.followers(machine_id) - 1
        if left > 0:
            self._followers[machine_id] = left
        else:
            self._followers.pop(machine_id, None)

    async def read(self, console_log: Path) -> AsyncIterator[bytes]:
        """What is kept of the console, oldest first."""
        for path in (previous_console_log(console_log), console_log):
            async for chunk in _chunks(path, 0):
                yield chunk

    async def follow(
        self,
        console_log: Path,
        still_logging: Callable[[], bool],
        slot: FollowerSlot,
    ) -> AsyncIterator[bytes]:
        """What is kept, then what the guest writes next, until it stops for good."""
        try:
            deadline = self._clock.monotonic() + self.follow_max_s
            async for chunk in _chunks(previous_console_log(console_log), 0):
                yield chunk
            offset, inode = 0, _inode(console_log)
            while True:
                current = _inode(console_log)
                if inode is not None and current != inode:
                    # Rotated: the rest of the file we read is now the older half.
                    async for chunk in _chunks(previous_console_log(console_log), offset):
                        yield chunk
                    offset = 0
                inode = current
                grew = False
                async for chunk in _chunks(console_log, offset):
                    offset += len(chunk)
                    grew = True
                    yield chunk
                if grew:
                    continue
                if not still_logging() or self._clock.monotonic() >= deadline:
                    return
                await self._clock.sleep(POLL_S)
        finally:
            slot.release()


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


async def _chunks(path: Path, offset: int) -> AsyncIterator[bytes]:
    """``path`` from ``offset`` to its end now, :data:`CHUNK` bytes a read."""
    try:
        stream = path.open("rb")
    except FileNotFoundError:
        return
    with stream:
        stream.seek(offset)
        while chunk := await asyncio.to_thread(stream.read, CHUNK):
            yield chunk
