"""VMM processes as /proc and pidfds show them, safe against pid reuse.

A pid alone does not name a process for long: once it exits, the kernel may give the
same pid to another. A handle therefore records the pid with its start time
(``/proc/PID/stat`` field 22, clock ticks since boot), and every check or signal goes
through :class:`ProcessRef`, a pidfd opened and then verified against that start time:
once a pidfd is open the pid cannot move to another process, so what the check saw is
what a later signal reaches.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from hangar.clock import Clock
from hangar.errors import VmmError
from hangar.vmm.deadline import run_with_deadline

PROC_ROOT = Path("/proc")

# Field numbers of /proc/PID/stat as proc(5) counts them, from 1.
_STAT_STATE_FIELD = 3
_STAT_STARTTIME_FIELD = 22


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    state: str
    start_time: int
    cmdline: tuple[str, ...]

    @property
    def exited(self) -> bool:
        """A zombie (exited, not yet reaped by its parent) or dead."""
        return self.state in ("Z", "X", "x")


def parse_stat(text: str) -> tuple[str, int]:
    """State letter and start time from the text of ``/proc/PID/stat``.

    The command name (field 2) is in parentheses and may itself hold spaces and
    parentheses, so fields are counted from the last ``)``.
    """
    after_name = text[text.rindex(")") + 1 :].split()
    state = after_name[_STAT_STATE_FIELD - 3]
    start_time = int(after_name[_STAT_STARTTIME_FIELD - 3])
    return state, start_time


def read_process(pid: int, proc_root: Path = PROC_ROOT) -> ProcessInfo | None:
    """The process now holding ``pid``, or None when there is none."""
    directory = proc_root / str(pid)
    try:
        stat_text = (directory / "stat").read_text()
        cmdline_bytes = (directory / "cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    state, start_time = parse_stat(stat_text)
    cmdline = tuple(os.fsdecode(arg) for arg in cmdline_bytes.split(b"\0")[:-1])
    return ProcessInfo(pid=pid, state=state, start_time=start_time, cmdline=cmdline)


class ProcessRef:
    """A pidfd on the process a (pid, start time) pair names. Use as a context manager."""

    def __init__(self, pidfd: int, info: ProcessInfo) -> None:
        self._pidfd = pidfd
        self.info = info

    @classmethod
    def open(cls, pid: int, start_time: int, proc_root: Path = PROC_ROOT) -> Self | None:
        """A reference to the process, or None when it has exited or the pid is reused."""
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        info = read_process(pid, proc_root)
        if info is None or info.start_time != start_time or info.exited:
            os.close(pidfd)
            return None
        return cls(pidfd, info)

    def has_exited(self) -> bool:
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return bool(poller.poll(0))

    async def wait_exited(self) -> None:
        """Return once the process has exited (it need not be our child)."""
        if self.has_exited():
            return
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()

        def on_readable() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(self._pidfd, on_readable)
        try:
            await exited
        finally:
            loop.remove_reader(self._pidfd)

    def send_signal(self, signum: int) -> None:
        """Signal the process; a process that has just exited is left alone."""
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signum)

    def close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


async def exits_within(process: ProcessRef, clock: Clock, seconds: float) -> bool:
    """Whether ``process`` exits within ``seconds`` of ``clock``."""
    try:
        await run_with_deadline(clock, seconds, process.wait_exited())
    except TimeoutError:
        return False
    return True


def is_alive(pid: int, start_time: int) -> bool:
    """Is the process a (pid, start time) pair names still running? Cheap: for polling."""
    process = ProcessRef.open(pid, start_time)
    if process is None:
        return False
    with process:
        return not process.has_exited()


def tail_text(path: Path, chars: int) -> str:
    """The last ``chars`` bytes of a log file, decoded; empty when it does not exist."""
    try:
        with path.open("rb") as file:
            file.seek(0, 2)
            size = file.tell()
            file.seek(max(0, size - chars))
            return file.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


class Children:
    """The VMM processes a driver started itself, each in its own session and reaped by a
    thread of its own when it ends (so no zombie waits for a caller), found again by the
    (pid, start time) pair its handle records. A VMM adopted after a restart is not here:
    its parent was the earlier agent."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._by_id: dict[tuple[int, int], subprocess.Popen[bytes]] = {}

    def spawn(
        self, argv: Sequence[str], *, stderr: Path | None, machine_id: str
    ) -> tuple[subprocess.Popen[bytes], int]:
        """Start ``argv`` (its stderr into ``stderr``, truncated, or nowhere), keep it, and
        return it with its start time."""
        try:
            with contextlib.ExitStack() as stack:
                err = stack.enter_context(stderr.open("wb")) if stderr else subprocess.DEVNULL
                child = subprocess.Popen(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    start_new_session=True,
                    close_fds=True,
                )
        except OSError as error:
            raise VmmError(
                f"cannot start the {self._what} {argv[0]}: {error.strerror or error}",
                machine_id=machine_id,
                argv=list(argv),
            ) from error
        info = read_process(child.pid)
        # Nothing has reaped the child yet, so its /proc entry is there even if it exited.
        assert info is not None
        self._by_id[(child.pid, info.start_time)] = child
        threading.Thread(
            target=child.wait, name=f"reap-{self._what}-{child.pid}", daemon=True
        ).start()
        return child, info.start_time

    def get(self, pid: int, start_time: int) -> subprocess.Popen[bytes] | None:
        return self._by_id.get((pid, start_time))

    async def exit_status(self, pid: int, start_time: int) -> int | None:
        """How a child that has ended ended; None for a process this driver did not start."""
        child = self.get(pid, start_time)
        if child is None:
            return None
        # It has exited, so waiting only lets the reaping thread finish.
        return await asyncio.to_thread(child.wait)


def adoption_refusal(
    pid: int, start_time: int, ours: Callable[[tuple[str, ...]], bool], what: str
) -> str | None:
    """Why the process a handle recorded (pid, start time) is not ``what`` for it any more,
    ``ours`` judging its command line; None when it still is."""
    info = read_process(pid)
    if info is None or info.exited:
        return "the process has exited"
    if info.start_time != start_time:
        return "the pid now belongs to a process started later"
    if not ours(info.cmdline):
        return f"the process is not {what}"
    return None
