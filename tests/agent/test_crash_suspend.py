"""Crash injection for suspend and resume: SIGKILL the server right after each step of a
``suspend`` and of the ``start`` of a suspended machine, start it again over the same home,
and check the machine ends suspended (whole snapshot, boot files kept, no VMM, no claim) or
resumed where it was (one VMM, the guest's count going on). One machine is booted once and
goes back and forth between the two states; each test first puts it where it needs it. The
same runs for a sandbox-tier machine (gVisor's checkpoint and restore) on the same server.

The window inside ``resume_vm`` (QEMU restoring, not yet recorded) is reproduced as a crash
leaves it: a start run recorded as having begun a restore, and the snapshot consumed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from hangar.agent.steps import new_run
from hangar.model.guest_contract import RunDir
from hangar.model.machine import MachineState
from hangar.model.run import RunProgress, StartRequest, SuspendRequest
from hangar.server_process import ServerProcess
from hangar.settings import DATABASE
from hangar.store.runs import SqliteRunStore
from hangar.vmm.snapshot import has_snapshot, revoke_snapshot
from tests.agent.helpers import (
    console_text,
    machine_path,
    run_machine,
    step_names,
    vmm_pids,
    wait_state,
)
from tests.agent.test_crash import armable_server, crash_during, crash_points, tier_guest
from tests.agent.test_suspend import TICKER, claims_of, ticks
from tests.api.helpers import wait_runs_finished

pytestmark = pytest.mark.slow

APP = "crash-suspend"


@dataclass
class Ticker:
    server: ServerProcess
    machine_id: str
    tier: str = "vm"

    @property
    def path(self) -> str:
        return machine_path(APP, self.machine_id)

    @property
    def state_file(self) -> Path:
        return self.server.home / "machines" / self.machine_id / "suspend.vmstate"


@pytest.fixture(scope="module")
def crash_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with armable_server(tmp_path_factory.mktemp("crash-suspend-home"), APP) as server:
        yield server


def boot_ticker(server: ServerProcess, test_image: str, tier: str) -> Ticker:
    with server.client() as api:
        machine_id = run_machine(api, APP, test_image, cmd=TICKER, **tier_guest(tier))
        wait_state(api, APP, machine_id, "started")
    return Ticker(server, machine_id, tier)


@pytest.fixture(scope="module")
def ticker(crash_server: ServerProcess, test_image: str) -> Ticker:
    """The VM tier's ticker."""
    return boot_ticker(crash_server, test_image, "vm")


@pytest.fixture(scope="module")
def sandbox_ticker(crash_server: ServerProcess, test_image: str) -> Ticker:
    """The sandbox tier's ticker (gVisor's checkpoint and restore), on the same server."""
    return boot_ticker(crash_server, test_image, "sandbox")


def ticker_of(request: pytest.FixtureRequest, tier: str) -> Ticker:
    ticker: Ticker = request.getfixturevalue("ticker" if tier == "vm" else "sandbox_ticker")
    return ticker


def _settled(api: httpx.Client, ticker: Ticker) -> str:
    wait_runs_finished(api, APP, ticker.machine_id, guard_s=180)
    state: str = api.get(ticker.path).json()["state"]
    return state


def put_in(ticker: Ticker, wanted: str) -> None:
    """Make the machine ``started`` or ``suspended``, whatever an earlier test left."""
    with ticker.server.client() as api:
        state = _settled(api, ticker)
        if state == wanted:
            return
        if wanted == "started":
            assert api.post(f"{ticker.path}/start").status_code == 200
        else:
            if state != "started":
                assert api.post(f"{ticker.path}/start").status_code == 200
                wait_state(api, APP, ticker.machine_id, "started")
            _ticking(api, ticker)  # a guest suspended before its first tick has no count
            assert api.post(f"{ticker.path}/suspend").status_code == 200
        wait_state(api, APP, ticker.machine_id, wanted)
        _settled(api, ticker)


def _ticking(api: httpx.Client, ticker: Ticker) -> None:
    """Wait until the guest's count has started (its console shows a tick)."""
    deadline = time.monotonic() + 120
    while not ticks(console_text(api, APP, ticker.machine_id)):
        assert time.monotonic() < deadline, "the guest never ticked"
        time.sleep(0.2)


def assert_suspended(api: httpx.Client, ticker: Ticker) -> None:
    assert _settled(api, ticker) == "suspended"
    run_dir = ticker.state_file.parent
    assert vmm_pids(ticker.server.home, ticker.machine_id) == []
    assert has_snapshot(ticker.state_file)
    if ticker.tier == "vm":
        assert (run_dir / RunDir.ROOT_DISK).exists() and (run_dir / RunDir.INITRD).exists()
    else:
        assert (run_dir / RunDir.BUNDLE / "rootfs").is_dir(), "the root it was saved over"
    assert claims_of(ticker.server, ticker.machine_id) == []


def assert_resumed(api: httpx.Client, ticker: Ticker, last_tick: int, gap: bool = False) -> None:
    """Started, one VMM, and the guest's count went on from where it was suspended (with
    ``gap``, ticks written while no agent read the console may be missing, never repeated)."""
    assert _settled(api, ticker) == "started"
    assert len(vmm_pids(ticker.server.home, ticker.machine_id)) == 1
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        seen = ticks(console_text(api, APP, ticker.machine_id))
        if seen and seen[-1] > last_tick + 2:
            break
        time.sleep(0.2)
    assert last_tick in seen, "the console of the suspended boot goes on"
    went_on = seen[seen.index(last_tick) :]
    if gap:
        assert went_on == sorted(set(went_on)) and went_on[-1] > last_tick + 2, went_on
    else:
        assert went_on == list(range(last_tick, seen[-1] + 1))
    assert not ticker.state_file.with_name("suspend.vmstate.json").exists()


@pytest.mark.parametrize(("step", "tier"), crash_points(step_names(SuspendRequest())))
def test_crash_during_suspend(request: pytest.FixtureRequest, step: str, tier: str) -> None:
    ticker = ticker_of(request, tier)
    put_in(ticker, "started")
    crash_during(
        ticker.server,
        "suspend",
        step,
        httpx.Request("POST", f"{ticker.server.url}{ticker.path}/suspend"),
    )
    with ticker.server.client() as api:
        wait_state(api, APP, ticker.machine_id, "suspended")
        assert_suspended(api, ticker)


_AFTER_RESTORE_STEPS = {
    "resume_vm",
    "prepare_root_disk",
    "prepare_root_tree",
    "prepare_initrd",
    "launch_vm",
    "map_gpu_addresses",
    "mark_started",
}
"""Crash points where the restored guest already runs while the agent is down: what it writes
to its console then is dropped (no one reads the console socket, and QEMU never makes a guest
wait for a reader), so its count shows a gap there."""


@pytest.mark.parametrize(("step", "tier"), crash_points(step_names(StartRequest())))
def test_crash_during_resume(request: pytest.FixtureRequest, step: str, tier: str) -> None:
    ticker = ticker_of(request, tier)
    put_in(ticker, "suspended")
    with ticker.server.client() as api:
        last_tick = ticks(console_text(api, APP, ticker.machine_id))[-1]
    crash_during(
        ticker.server,
        "start",
        step,
        httpx.Request("POST", f"{ticker.server.url}{ticker.path}/start"),
    )
    with ticker.server.client() as api:
        wait_state(api, APP, ticker.machine_id, "started")
        assert_resumed(api, ticker, last_tick, gap=step in _AFTER_RESTORE_STEPS)


def test_a_restore_cut_short_boots_afresh(ticker: Ticker) -> None:
    """A crash while QEMU restored the guest: the run had recorded that a restore began, and
    the snapshot is consumed (the guest may have run on from its disk). The start goes on
    with a fresh root disk and says so."""
    put_in(ticker, "suspended")
    with ticker.server.client() as api:
        earlier = len(console_text(api, APP, ticker.machine_id))  # the console spans boots
    ticker.server.kill()
    run = new_run(ticker.machine_id, StartRequest(), time.time())
    run.progress = RunProgress(current_step="resume_vm", resume_attempted=True)
    runs = SqliteRunStore(ticker.server.home / DATABASE)
    try:
        runs.insert_run(run)
    finally:
        runs.close()
    revoke_snapshot(ticker.state_file)
    ticker.server.start()
    with ticker.server.client() as api:
        wait_state(api, APP, ticker.machine_id, "started")
        assert _settled(api, ticker) == MachineState.STARTED
        events = api.get(f"{ticker.path}/events").json()
        [cold] = [e for e in events if e["type"] == "resume" and e["status"] == "cold_boot"]
        assert "cut short" in cold["reason"]
        deadline = time.monotonic() + 120
        while not ticks(this_boot := console_text(api, APP, ticker.machine_id)[earlier:]):
            assert time.monotonic() < deadline, "the fresh boot never ticked"
            time.sleep(0.2)
        assert ticks(this_boot)[0] == 1, "a fresh boot"
        assert not re.search("resumed", this_boot)
        assert len(vmm_pids(ticker.server.home, ticker.machine_id)) == 1


def test_a_suspended_machine_whose_snapshot_is_gone_is_stopped_at_restart(ticker: Ticker) -> None:
    put_in(ticker, "suspended")
    ticker.server.stop()
    for leftover in ticker.state_file.parent.glob("suspend.vmstate*"):
        leftover.unlink()
    ticker.server.start()
    with ticker.server.client() as api:
        machine = api.get(ticker.path).json()
        assert machine["state"] == "stopped"
        assert "snapshot is gone" in machine["failure_reason"]
        events = api.get(f"{ticker.path}/events").json()
        assert events[0]["type"] == "stop" and events[0]["source"] == "flyd"
        assert "snapshot is gone" in events[0]["reason"]
        run_dir = ticker.state_file.parent
        assert not (run_dir / RunDir.ROOT_DISK).exists(), "its boot files go with it"
        assert api.post(f"{ticker.path}/start").status_code == 200
        wait_state(api, APP, ticker.machine_id, "started")
