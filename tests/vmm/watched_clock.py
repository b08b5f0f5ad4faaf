"""A ManualClock a test can advance exactly when the code under test waits on it."""

from __future__ import annotations

import asyncio

from hangar.clock import ManualClock


class WatchedClock(ManualClock):
    """Reports each sleep it starts, so a test advances it only once the code sleeps."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeps_started: asyncio.Queue[float] = asyncio.Queue()

    async def sleep(self, seconds: float) -> None:
        self.sleeps_started.put_nowait(seconds)
        await super().sleep(seconds)

    async def advance_once_sleeping(self, seconds: float) -> None:
        """Wait for a sleep of exactly ``seconds`` to start, then let it pass."""
        while await self.sleeps_started.get() != seconds:
            pass
        self.advance(seconds)
