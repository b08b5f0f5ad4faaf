"""run_with_deadline on a manual clock."""

from __future__ import annotations

import asyncio

import pytest

from hangar.vmm.deadline import run_with_deadline
from tests.vmm.watched_clock import WatchedClock


async def test_a_result_in_time_is_returned() -> None:
    async def answer() -> int:
        return 42

    assert await run_with_deadline(WatchedClock(), 5.0, answer()) == 42


async def test_work_still_pending_when_the_clock_passes_the_deadline_is_cancelled() -> None:
    clock = WatchedClock()
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    waiting = asyncio.create_task(run_with_deadline(clock, 5.0, never))
    await clock.advance_once_sleeping(5.0)

    with pytest.raises(TimeoutError):
        await waiting
    assert never.cancelled()


async def test_errors_of_the_work_pass_through() -> None:
    async def broken() -> None:
        raise ValueError("broken")

    with pytest.raises(ValueError, match="broken"):
        await run_with_deadline(WatchedClock(), 5.0, broken())
