"""Bounded waits for device state, with an injectable clock so tests never sleep.

Device operations run in worker threads (the agent calls them through ``asyncio.to_thread``),
so polling here is synchronous: :class:`PollClock` gives ``monotonic`` and a blocking
``pause``. Every wait has a deadline; running out raises :class:`DeviceError` with
``timed_out=True``, which the handoff turns into quarantine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from hangar.errors import DeviceError

T = TypeVar("T")


class PollClock(Protocol):
    def monotonic(self) -> float: ...

    def pause(self, seconds: float) -> None:
        """Block for ``seconds`` (a test clock advances instead)."""
        ...


class SystemPollClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def pause(self, seconds: float) -> None:
        time.sleep(seconds)


def poll_until(
    check: Callable[[], T | None],
    *,
    timeout_s: float,
    interval_s: float,
    clock: PollClock,
    what: str,
    **fields: Any,
) -> T:
    """The first non-None answer of ``check``; DeviceError once ``timeout_s`` has passed.

    ``check`` runs at least once, and once more at the deadline, so a slow clock never
    turns a finished operation into a timeout.
    """
    deadline = clock.monotonic() + timeout_s
    while True:
        answer = check()
        if answer is not None:
            return answer
        remaining = deadline - clock.monotonic()
        if remaining <= 0:
            raise DeviceError(
                f"{what}: not done within {timeout_s:g} s",
                timed_out=True,
                timeout_s=timeout_s,
                retry=False,
                **fields,
            )
        clock.pause(min(interval_s, remaining))
