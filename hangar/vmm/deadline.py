"""Bounding an awaitable by an injected :class:`hangar.clock.Clock`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from hangar.clock import Clock

T = TypeVar("T")


async def run_with_deadline(clock: Clock, seconds: float, awaitable: Awaitable[T]) -> T:
    """The awaitable's result, or :class:`TimeoutError` once ``clock`` has slept ``seconds``.

    The awaitable is cancelled on timeout.
    """
    work = asyncio.ensure_future(awaitable)
    timer = asyncio.ensure_future(clock.sleep(seconds))
    try:
        await asyncio.wait({work, timer}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
    if work.cancelled():
        raise TimeoutError(f"not done within {seconds} s")
    return work.result()
