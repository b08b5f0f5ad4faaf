"""Metering through crashes of a real ``hangar server`` with a real guest: SIGKILL the server
in the middle of a machine's interval and check the totals.

- The guest keeps running while the server is down: after the restart its one interval goes
  on, and once the machine stops it covers the whole run, the downtime counted once.
- The guest dies while the server is down: its interval ends at the last checkpoint written
  before the crash, exactly; the time nobody saw is not billed.
In both, restarting once more and asking again changes nothing.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from hangar.model.usage import UsageInterval
from hangar.server_process import ServerProcess
from hangar.settings import DATABASE, env_name
from hangar.store.usage import SqliteUsageStore
from tests.agent.helpers import machine_path, run_machine, vmm_pids, wait_state
from tests.api.helpers import wait_runs_finished
from tests.conftest import running_server

pytestmark = pytest.mark.slow

APP = "metered"
SLEEPER = ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]
CHECKPOINT_S = "1"
GUARD_S = 120.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    env = {env_name("usage_checkpoint_s"): CHECKPOINT_S}
    with running_server(tmp_path / "home", APP, env) as started:
        yield started


def intervals(server: ServerProcess, machine_id: str) -> list[UsageInterval]:
    store = SqliteUsageStore(server.home / DATABASE)
    try:
        return [i for i in store.intervals(None, 0.0, 1e12) if i.machine_id == machine_id]
    finally:
        store.close()


def until_interval(
    server: ServerProcess, machine_id: str, ready: Callable[[UsageInterval], bool]
) -> UsageInterval:
    """Poll the usage store until the machine's one interval satisfies ``ready``."""
    deadline = time.monotonic() + GUARD_S
    while time.monotonic() < deadline:
        found = intervals(server, machine_id)
        assert len(found) <= 1, found
        if found and ready(found[0]):
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"usage of {machine_id} never got there: {intervals(server, machine_id)}")


def event_ms(api: httpx.Client, machine_id: str, event_type: str, status: str) -> float:
    events = api.get(machine_path(APP, machine_id) + "/events").json()
    stamps = [e["timestamp"] for e in events if (e["type"], e["status"]) == (event_type, status)]
    assert stamps, events
    return float(max(stamps)) / 1000


def whole_ms(seconds: float) -> float:
    return math.floor(seconds * 1000) / 1000


def usage_seconds(api: httpx.Client, machine_id: str) -> float:
    response = api.get("/v1/orgs/personal/usage", params={"group_by": "machine"})
    assert response.status_code == 200, response.text
    return sum(g["seconds"] for g in response.json()["groups"] if g["key"] == machine_id)


def started_machine(server: ServerProcess, image: str) -> str:
    with server.client() as api:
        machine_id = run_machine(api, APP, image, cmd=SLEEPER)
        wait_state(api, APP, machine_id, "started")
        wait_runs_finished(api, APP, machine_id)
    first = until_interval(server, machine_id, lambda i: True)
    until_interval(server, machine_id, lambda i: i.until >= first.started_at + 2)
    return machine_id


def test_a_guest_running_through_the_crash_is_billed_once(
    server: ServerProcess, test_image: str
) -> None:
    machine_id = started_machine(server, test_image)
    server.kill()
    at_crash = intervals(server, machine_id)[0]
    assert not at_crash.closed
    assert len(vmm_pids(server.home, machine_id)) == 1
    server.start()
    resumed = until_interval(server, machine_id, lambda i: i.until > at_crash.until + 1)
    assert resumed.id == at_crash.id and resumed.started_at == at_crash.started_at
    with server.client() as api:
        stop = api.post(machine_path(APP, machine_id) + "/stop", json={"timeout": "5s"})
        assert stop.status_code == 200, stop.text
        wait_state(api, APP, machine_id, "stopped")
        wait_runs_finished(api, APP, machine_id)
        (closed,) = intervals(server, machine_id)
        assert closed.closed and closed.id == at_crash.id
        # It covers the boot from launch to release, across the crash.
        # Events carry whole milliseconds, so compare at that resolution.
        started_at, until = whole_ms(closed.started_at), whole_ms(closed.until)
        assert event_ms(api, machine_id, "start", "starting") <= started_at
        assert started_at <= event_ms(api, machine_id, "start", "started")
        assert event_ms(api, machine_id, "exit", "stopped") <= until
        assert until <= event_ms(api, machine_id, "stop", "stopped")
        billed = usage_seconds(api, machine_id)
        assert billed == pytest.approx(closed.until - closed.started_at, abs=0.002)
    server.stop()
    server.start()
    with server.client() as api:
        assert usage_seconds(api, machine_id) == billed
    assert intervals(server, machine_id) == [closed]


def test_a_guest_that_died_during_the_crash_is_billed_to_the_last_checkpoint(
    server: ServerProcess, test_image: str
) -> None:
    machine_id = started_machine(server, test_image)
    server.kill()
    at_crash = intervals(server, machine_id)[0]
    (pid,) = vmm_pids(server.home, machine_id)
    os.kill(pid, signal.SIGKILL)
    server.start()
    with server.client() as api:
        wait_state(api, APP, machine_id, "stopped")
        wait_runs_finished(api, APP, machine_id)
        (closed,) = intervals(server, machine_id)
        assert closed.closed
        assert (closed.id, closed.started_at, closed.until) == (
            at_crash.id,
            at_crash.started_at,
            at_crash.until,
        )
        billed = usage_seconds(api, machine_id)
        assert billed == pytest.approx(at_crash.until - at_crash.started_at, abs=0.002)
        assert billed >= 2.0
    server.stop()
    server.start()
    with server.client() as api:
        assert usage_seconds(api, machine_id) == billed
    assert intervals(server, machine_id) == [closed]
