"""The one seam through which hangar.images runs external programs (skopeo, umoci, mke2fs...)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from hangar.errors import HangarError

STDERR_TAIL_CHARS = 2000

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


def run_command(
    argv: Argv,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> str:
    """Default runner: subprocess, stdin closed, stdout decoded losslessly (surrogateescape)."""
    words = [os.fspath(word) for word in argv]
    try:
        completed = subprocess.run(
            words,
            cwd=cwd,
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise CommandError(words, 127, f"{words[0]} is not installed: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if exc.stderr else ""
        raise CommandError(words, None, stderr) from exc
    if completed.returncode != 0:
        raise CommandError(words, completed.returncode, completed.stderr.decode(errors="replace"))
    return completed.stdout.decode(errors="surrogateescape")


def stdout_bytes(stdout: str) -> bytes:
    """The exact bytes a command printed (inverse of the decoding ``run_command`` applies)."""
    return stdout.encode(errors="surrogateescape")
