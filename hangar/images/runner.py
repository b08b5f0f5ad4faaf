"""The one seam through which hangar.images runs external programs (umoci, mke2fs, qemu-img...).

Every command runs in a process group of its own and is killed, group and all, when it runs
past its timeout (image work always passes one, :data:`DEFAULT_TIMEOUT_S` by default) or when
the job it runs for is cancelled (:class:`Cancellation`, set for the calling thread by
:func:`cancellable`): a stuck command never holds a worker, and a force-destroyed machine's
image work stops.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from hangar.errors import HangarError

STDERR_TAIL_CHARS = 2000
DEFAULT_TIMEOUT_S = 600.0
POLL_S = 0.2
"""How often a running command looks whether its job was cancelled."""

Argv = Sequence[str | os.PathLike[str]]


class CommandError(HangarError):
    """A command exited non-zero, could not be started, or ran past its timeout."""

    code = "command_failed"

    def __init__(self, argv: Argv, returncode: int | None, stderr: str) -> None:
        words = [os.fspath(word) for word in argv]
        tail = stderr[-STDERR_TAIL_CHARS:].strip()
        status = "timed out" if returncode is None else f"exited {returncode}"
        super().__init__(
            f"{words[0]} {status}: {tail or '(no stderr)'}",
            argv=words,
            returncode=returncode,
            stderr=tail,
        )
        self.argv = words
        self.returncode = returncode
        self.stderr = tail


class Cancelled(HangarError):
    """The job a command or download ran for was cancelled (its machine is being destroyed)."""

    code = "cancelled"

    def __init__(self, reason: str) -> None:
        super().__init__(f"cancelled: {reason}", reason=reason)
        self.reason = reason


class Cancellation:
    """A job's cancellation flag, set from any thread; what is waiting on it is told."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self.reason = ""
        self._callbacks: list[Callable[[], None]] = []

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self, reason: str) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self.reason = reason
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def on_cancel(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when cancelled (now, if it is already); returns an undo."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return lambda: self._forget(callback)
        callback()
        return lambda: None

    def _forget(self, callback: Callable[[], None]) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._callbacks.remove(callback)

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled(self.reason)

    def wait(self, seconds: float) -> bool:
        return self._event.wait(seconds)


_current = threading.local()


@contextlib.contextmanager
def cancellable(cancellation: Cancellation) -> Iterator[Cancellation]:
    """Commands this thread runs inside the block are killed if ``cancellation`` is set."""
    previous = getattr(_current, "cancellation", None)
    _current.cancellation = cancellation
    try:
        yield cancellation
    finally:
        _current.cancellation = previous


def current_cancellation() -> Cancellation | None:
    found = getattr(_current, "cancellation", None)
    return found if isinstance(found, Cancellation) else None


class CommandRunner(Protocol):
    def __call__(
        self,
        argv: Argv,
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> str:
        """Run ``argv`` and return its stdout; raise ``CommandError`` on failure."""
        ...


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        process.kill()


def run_command(
    argv: Argv,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> str:
    """Default runner: subprocess in its own process group, stdin closed, stdout decoded
    losslessly (surrogateescape); killed past ``timeout`` (None: no limit) or when the
    thread's job is cancelled."""
    words = [os.fspath(word) for word in argv]
    limit = float("inf") if timeout is None else timeout
    cancellation = current_cancellation()
    if cancellation is not None:
        cancellation.check()
    try:
        process = subprocess.Popen(
            words,
            cwd=cwd,
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise CommandError(words, 127, f"{words[0]} is not installed: {exc}") from exc
    waited = 0.0
    try:
        while True:
            step = min(POLL_S if cancellation is not None else limit, max(0.0, limit - waited))
            try:
                stdout, stderr = process.communicate(timeout=None if step == float("inf") else step)
                break
            except subprocess.TimeoutExpired:
                waited += step
                if cancellation is not None and cancellation.cancelled:
                    _kill_group(process)
                    process.communicate()
                    raise Cancelled(cancellation.reason) from None
                if waited >= limit:
                    _kill_group(process)
                    _out, partial = process.communicate()
                    raise CommandError(
                        words, None, partial.decode(errors="replace") + f" (after {limit:g}s)"
                    ) from None
    except BaseException:
        if process.poll() is None:
            _kill_group(process)
            process.wait()
        raise
    if process.returncode != 0:
        raise CommandError(words, process.returncode, stderr.decode(errors="replace"))
    return stdout.decode(errors="surrogateescape")


def stdout_bytes(stdout: str) -> bytes:
    """The exact bytes a command printed (inverse of the decoding ``run_command`` applies)."""
    return stdout.encode(errors="surrogateescape")
