"""The image pool: one org's stuck pulls never take every thread, a cancelled job stops
(its command killed), and no command runs past its timeout."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from hangar.images.runner import Cancellation, CommandError, cancellable, run_command
from hangar.images.workers import ImageWorkers

GUARD_S = 30.0


def test_one_owner_never_holds_more_than_its_share() -> None:
    pool = ImageWorkers(threads=3, per_owner=2)
    release = threading.Event()
    lock = threading.Lock()
    concurrent = [0, 0]  # now, most ever

    def stuck(cancellation: Cancellation) -> str:
        with lock:
            concurrent[0] += 1
            concurrent[1] = max(concurrent)
        try:
            while not release.wait(0.05):
                cancellation.check()
        finally:
            with lock:
                concurrent[0] -= 1
        return "a"

    async def scenario() -> str:
        a_jobs = [asyncio.ensure_future(pool.run("org-a", stuck)) for _ in range(6)]
        await asyncio.sleep(0)
        # org-a's six jobs are stuck; org-b's still gets a thread.
        b = await asyncio.wait_for(pool.run("org-b", lambda _c: "b"), GUARD_S)
        assert not release.is_set() and all(not job.done() for job in a_jobs)
        release.set()
        await asyncio.gather(*a_jobs)
        return b

    assert asyncio.run(scenario()) == "b"
    assert concurrent[1] <= 2, f"org-a ran {concurrent[1]} jobs at once"


def test_cancelling_the_awaiting_task_kills_the_running_command() -> None:
    pool = ImageWorkers(threads=1, per_owner=1)
    started = threading.Event()

    def long_command(cancellation: Cancellation) -> str:
        started.set()
        return run_command(["sleep", "300"], timeout=600)

    async def scenario() -> None:
        job = asyncio.ensure_future(pool.run("org", long_command))
        while not started.is_set():
            await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(pool.run("org", lambda _c: "never"))
        await asyncio.sleep(0.2)
        job.cancel()
        queued.cancel()
        for task in (job, queued):
            with pytest.raises(asyncio.CancelledError):
                await task

    began = time.monotonic()
    asyncio.run(scenario())
    deadline = time.monotonic() + GUARD_S
    while pool.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.running() == {} and pool.queued() == {}
    assert time.monotonic() - began < GUARD_S, "the command was killed, not waited for"


def test_commands_are_killed_with_their_children_past_the_timeout() -> None:
    began = time.monotonic()
    with pytest.raises(CommandError) as raised:
        run_command(["sh", "-c", "sleep 300 & echo $! >&2; sleep 300"], timeout=0.5)
    assert raised.value.returncode is None and "after 0.5s" in raised.value.stderr
    child = int(raised.value.stderr.split()[0])
    deadline = time.monotonic() + GUARD_S
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the command's child {child} outlived its timeout")
    assert time.monotonic() - began < GUARD_S


def test_a_cancellation_stops_a_command_at_once() -> None:
    cancellation = Cancellation()
    threading.Timer(0.3, lambda: cancellation.cancel("destroyed")).start()
    began = time.monotonic()
    with cancellable(cancellation), pytest.raises(Exception) as raised:
        run_command(["sleep", "300"], timeout=600)
    assert "cancelled: destroyed" in str(raised.value)
    assert time.monotonic() - began < GUARD_S
