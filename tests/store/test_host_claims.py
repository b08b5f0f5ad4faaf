"""The scheduler's claim protocol on SQLite: racing schedulers, each on its own connection to
one database file (as API replicas would be), never both win a GPU."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from hangar.errors import InsufficientCapacity
from hangar.model.gpu import GpuState
from hangar.scheduler import Claim, Scheduler
from hangar.store.host_claims import SqliteClaimStore, host_state_from_json, host_state_to_json
from tests.scheduler.fleet import gpu_host, whole
from tests.scheduler.test_claims import assert_each_gpu_held_once


def test_host_state_round_trips_through_json() -> None:
    host = gpu_host("gpu-1", gpus=2).with_claim(Claim("m1", 1000, 512, (1,), 1000))
    host = host.with_gpu_state(0, GpuState.QUARANTINED)
    assert host_state_from_json(host_state_to_json(host)) == host


def test_compare_and_set_writes_once_per_version(tmp_path: Path) -> None:
    store = SqliteClaimStore(tmp_path / "db")
    record = store.put_host(gpu_host("gpu-1"))
    assert record.version == 1
    claimed = record.state.with_claim(Claim("m1", 1000, 512, (0,), 1000))
    assert store.compare_and_set("gpu-1", 1, claimed)
    assert not store.compare_and_set("gpu-1", 1, record.state), "a stale version loses"
    current = store.read_host("gpu-1")
    assert current is not None and current.version == 2 and current.state == claimed
    with pytest.raises(ValueError):
        store.compare_and_set("gpu-1", 2, gpu_host("other"))


def test_racing_schedulers_on_separate_connections_win_exactly_the_gpus(tmp_path: Path) -> None:
    path = tmp_path / "db"
    setup = SqliteClaimStore(path)
    for n in range(4):
        setup.put_host(gpu_host(f"gpu-{n}", gpus=2))
    threads_count, per_thread = 8, 4
    schedulers = [Scheduler(SqliteClaimStore(path)) for _ in range(threads_count)]
    start = threading.Barrier(threads_count)
    wins: list[str] = []
    lock = threading.Lock()

    def run(number: int) -> None:
        start.wait()
        for attempt in range(per_thread):
            machine = f"m-{number}-{attempt}"
            try:
                schedulers[number].place(whole(machine, cpu=1))
            except InsufficientCapacity:
                continue
            with lock:
                wins.append(machine)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snapshot = SqliteClaimStore(path).snapshot()
    assert len(wins) == 8
    assert assert_each_gpu_held_once(snapshot) == 8
    assert sorted(c.machine_id for r in snapshot.values() for c in r.state.claims) == sorted(wins)
