"""A real terminal for CLI tests: a tmux session of its own (its own server socket, a random
name), 80 columns wide, running bash; commands are typed into it and the test reads the
screen as a person would see it."""

from __future__ import annotations

import re
import secrets
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

COLUMNS = 80
LINES = 50
GUARD_S = 240.0


class Terminal:
    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.socket = f"hangar-test-{secrets.token_hex(4)}"
        self.env = env
        self._cwd = cwd
        self._count = 0

    def _tmux(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-L", self.socket, *args], check=True, capture_output=True, text=True
        )
        return result.stdout

    def __enter__(self) -> Self:
        environment = [arg for key, value in self.env.items() for arg in ("-e", f"{key}={value}")]
        self._tmux(
            "-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", str(COLUMNS),
            "-y", str(LINES), "-c", str(self._cwd), *environment,
            "bash --norc --noprofile",
        )  # fmt: skip
        self._tmux("set-option", "-t", "t", "history-limit", "5000")
        # tmux gives a new session the PATH of the tmux command itself: set it again.
        path = self.env.get("PATH")
        self.run("PS1='$ '; stty -echoctl" + (f"; export PATH='{path}'" if path else ""))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)

    def screen(self) -> str:
        """What the terminal shows now (its visible 80x50 cells)."""
        return self._tmux("capture-pane", "-p", "-t", "t")

    def history(self, joined: bool = False) -> str:
        """Everything printed since the last ``clear``: as the screen wrapped it at 80
        columns, or with wrapped lines joined back (``joined``)."""
        return self._tmux("capture-pane", "-p", "-t", "t", "-S", "-", *(["-J"] if joined else []))

    def clear(self) -> None:
        """An empty screen and no history: what follows is the next command's alone."""
        self._tmux("send-keys", "-t", "t", "clear", "Enter")
        deadline = time.monotonic() + GUARD_S
        while self.screen().strip() != "$":
            if time.monotonic() > deadline:
                raise AssertionError(f"the screen did not clear:\n{self.screen()}")
            time.sleep(0.05)
        self._tmux("clear-history", "-t", "t")

    def run(self, command: str, guard_s: float = GUARD_S) -> tuple[str, int]:
        """Type ``command``, wait until it has finished; returns what it printed (wrapped
        lines joined) and its exit status."""
        self._count += 1
        marker = f"__done_{self._count}__"
        self._tmux("send-keys", "-t", "t", f"{command}; echo {marker} $?", "Enter")
        deadline = time.monotonic() + guard_s
        while time.monotonic() < deadline:
            text = self.history(joined=True)
            typed = text.rfind(f"echo {marker}")
            done = re.search(rf"^{marker} (\d+)\s*$", text, re.MULTILINE)
            if done is not None and typed >= 0:
                output = text[typed : done.start()]
                return output.split("\n", 1)[1] if "\n" in output else "", int(done.group(1))
            time.sleep(0.1)
        raise AssertionError(f"{command!r} did not finish; the screen:\n{self.screen()}")
