"""A command runner that runs the real commands and records them, for cache assertions."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path

from hangar.images.runner import Argv, run_command


class RecordingRunner:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self._lock = threading.Lock()

    def __call__(
        self,
        argv: Argv,
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> str:
        words = [os.fspath(word) for word in argv]
        with self._lock:
            self.calls.append(words)
        return run_command(words, cwd=cwd, env=env, timeout=timeout)

    def programs(self) -> list[str]:
        return [" ".join(call[:2]) for call in self.calls]
