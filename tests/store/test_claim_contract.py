"""The scheduler's claim protocol, the same tests on every store: in memory, SQLite, etcd.

Each backend gives a way to open another handle on the same store (a second SQLite connection,
a second etcd client): racing schedulers each hold their own, as API replicas would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import pytest

from hangar.errors import InsufficientCapacity, InvalidRequest
from hangar.scheduler import (
    Claim,
    ClaimStore,
    HostState,
    InMemoryClaimStore,
    Placement,
    Scheduler,
    VersionedHost,
    compare_and_set_many,
)
from hangar.store.etcd.claims import EtcdClaimStore
from hangar.store.etcd.client import EtcdClient
from hangar.store.etcd.keys import KeyLayout
from hangar.store.etcd.local import LocalEtcdCluster
from hangar.store.host_claims import SqliteClaimStore
from tests.scheduler.fleet import general_host, gpu_host, mig_host, slice_of, whole
from tests.scheduler.test_claims import assert_each_gpu_held_once


class RegisteringStore(ClaimStore, Protocol):
    """Every backend also registers hosts (inventory), outside the scheduler's protocol."""

    def put_host(self, host: HostState) -> VersionedHost: ...


class Backend:
    """Opens handles on one store; ``put_host`` registers a host through the first handle."""

    def __init__(self, open_handle: Callable[[int], RegisteringStore]) -> None:
        self._open = open_handle
        self.handles: list[RegisteringStore] = []

    def open(self) -> RegisteringStore:
        handle = self._open(len(self.handles))
        self.handles.append(handle)
        return handle

    def put_host(self, host: HostState) -> VersionedHost:
        return (self.handles[0] if self.handles else self.open()).put_host(host)


@pytest.fixture(params=["memory", "sqlite", "etcd"])
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, etcd_layout: KeyLayout
) -> Iterator[Backend]:
    closers: list[Callable[[], None]] = []
    if request.param == "memory":
        shared = InMemoryClaimStore()
        yield Backend(lambda _: shared)
        return
    if request.param == "sqlite":

        def open_sqlite(_: int) -> RegisteringStore:
            store = SqliteClaimStore(tmp_path / "claims.sqlite")
            closers.append(store.close)
            return store

        yield Backend(open_sqlite)
    else:
        cluster: LocalEtcdCluster = request.getfixturevalue("etcd_cluster")

        def open_etcd(number: int) -> RegisteringStore:
            client = EtcdClient(cluster.endpoints, timeout_s=5.0)
            store = EtcdClaimStore(client, etcd_layout)
            if number % 2:  # every other handle reads its snapshots from the watch-fed cache
                store.start()
            closers.append(client.close)
            closers.append(store.close)
            return store

        yield Backend(open_etcd)
    for close in reversed(closers):
        close()


def test_compare_and_set_writes_once_per_version(backend: Backend) -> None:
    record = backend.put_host(gpu_host("gpu-1"))
    store = backend.open()
    assert record.version == 1
    claimed = record.state.with_claim(Claim("m1", 1000, 512, (0,), 1000))
    assert store.compare_and_set("gpu-1", 1, claimed)
    assert not store.compare_and_set("gpu-1", 1, record.state), "a stale version loses"
    assert not store.compare_and_set("gpu-1", 3, record.state), "a future version loses"
    current = store.read_host("gpu-1")
    assert current is not None and current.version == 2 and current.state == claimed
    with pytest.raises(ValueError):
        store.compare_and_set("gpu-1", 2, gpu_host("other"))


def test_an_unknown_host_is_never_written(backend: Backend) -> None:
    store = backend.open()
    assert store.read_host("ghost") is None
    assert not store.compare_and_set("ghost", 0, gpu_host("ghost"))
    assert not store.compare_and_set("ghost", 1, gpu_host("ghost"))
    assert store.read_host("ghost") is None
    assert "ghost" not in store.snapshot()


def test_registering_a_host_again_bumps_its_version(backend: Backend) -> None:
    backend.put_host(general_host("cpu-1"))
    again = backend.put_host(general_host("cpu-1", cpu=32))
    assert again.version == 2
    record = backend.open().read_host("cpu-1")
    assert record is not None and record.version == 2 and record.state.cpu_milli == 32_000


def test_a_snapshot_holds_every_host_at_its_version(backend: Backend) -> None:
    for n in range(5):
        backend.put_host(gpu_host(f"gpu-{n}", gpus=2))
    store = backend.open()
    first = store.read_host("gpu-3")
    assert first is not None
    assert store.compare_and_set("gpu-3", 1, first.state.with_claim(Claim("m1", 1000, 512)))
    snapshot = store.snapshot()
    assert sorted(snapshot) == [f"gpu-{n}" for n in range(5)]
    assert {host_id: record.version for host_id, record in snapshot.items()} == {
        "gpu-0": 1,
        "gpu-1": 1,
        "gpu-2": 1,
        "gpu-3": 2,
        "gpu-4": 1,
    }
    assert [claim.machine_id for claim in snapshot["gpu-3"].state.claims] == ["m1"]


def test_a_batch_of_writes_wins_or_loses_host_by_host(backend: Backend) -> None:
    for n in range(3):
        backend.put_host(general_host(f"cpu-{n}"))
    store = backend.open()
    states = {n: store.read_host(f"cpu-{n}") for n in range(3)}
    writes = []
    for n, record in states.items():
        assert record is not None
        version = record.version if n != 1 else record.version + 5  # cpu-1 is stale
        writes.append((f"cpu-{n}", version, record.state.with_claim(Claim(f"m{n}", 1000, 512))))
    assert compare_and_set_many(store, writes) == [True, False, True]
    snapshot = store.snapshot()
    assert [len(snapshot[f"cpu-{n}"].state.claims) for n in range(3)] == [1, 0, 1]
    with pytest.raises(ValueError):
        compare_and_set_many(store, [writes[0], writes[0]])


@pytest.mark.parametrize("batch", [1, 3])
def test_racing_schedulers_win_exactly_the_gpus_there_are(backend: Backend, batch: int) -> None:
    for n in range(4):
        backend.put_host(gpu_host(f"gpu-{n}", gpus=2))
    threads_count, per_thread = 8, 4
    # A scheduler loses a race on a host only after someone else wrote it, and the 8 GPUs take
    # at most 8 writes; a batch sits a lost host out for the round after. So with 2 * 8 + 1
    # tries no placement can give up on lost races: every loser ends placed or refused.
    schedulers = [Scheduler(backend.open(), max_attempts=17) for _ in range(threads_count)]
    start = threading.Barrier(threads_count)
    wins: list[str] = []
    refusals: list[str] = []
    lock = threading.Lock()

    def run(number: int) -> None:
        start.wait()
        requests = [whole(f"m-{number}-{attempt}", cpu=1) for attempt in range(per_thread)]
        for first in range(0, per_thread, batch):
            chunk = requests[first : first + batch]
            if batch == 1:
                try:
                    schedulers[number].place(chunk[0])
                    answers: list[object] = [None]
                except InsufficientCapacity as error:
                    answers = [error]
            else:
                answers = list(schedulers[number].place_many(chunk))
            with lock:
                for request, answer in zip(chunk, answers, strict=True):
                    if isinstance(answer, InsufficientCapacity):
                        refusals.append(request.machine_id)
                    else:
                        assert answer is None or isinstance(answer, Placement), answer
                        wins.append(request.machine_id)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snapshot = backend.open().snapshot()
    assert len(wins) == 8
    assert len(refusals) == threads_count * per_thread - 8
    assert assert_each_gpu_held_once(snapshot) == 8
    assert sorted(c.machine_id for r in snapshot.values() for c in r.state.claims) == sorted(wins)
    assert sum(s.stats.lost_races for s in schedulers) > 0


def test_place_many_fills_a_host_in_one_write_and_reports_each_request(backend: Backend) -> None:
    backend.put_host(gpu_host("gpu-1", gpus=2))
    scheduler = Scheduler(backend.open())
    answers = scheduler.place_many(
        [whole("m1"), whole(""), whole("m2"), whole("m3"), whole("m1", cpu=1)]
    )
    assert [type(answer) for answer in answers] == [
        Placement,
        InvalidRequest,
        Placement,
        InsufficientCapacity,
        InsufficientCapacity,
    ]
    record = backend.open().read_host("gpu-1")
    assert record is not None and record.version == 2, "both claims in one compare-and-set"
    assert sorted(claim.machine_id for claim in record.state.claims) == ["m1", "m2"]


def test_place_many_retries_what_lost_on_fresh_data(backend: Backend) -> None:
    backend.put_host(gpu_host("gpu-1", gpus=2))
    backend.put_host(gpu_host("gpu-2", gpus=2))
    stale, fresh = Scheduler(backend.open()), Scheduler(backend.open())
    taken = fresh.place(whole("first"))
    answers = stale.place_many([whole("a"), whole("b"), whole("c")])
    assert all(isinstance(answer, Placement) for answer in answers)
    assert stale.stats.lost_races >= 1 and stale.stats.retried >= 1
    snapshot = backend.open().snapshot()
    assert assert_each_gpu_held_once(snapshot) == 4
    assert taken.host_id in {p.host_id for p in answers if isinstance(p, Placement)}


def test_a_gpu_fixed_in_mig_mode_stays_so_through_the_store(backend: Backend) -> None:
    layout = ("3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb")
    host = mig_host("mig-1", gpus=2, layout=layout, plain=1, fixed=True)
    backend.put_host(host)
    reader = backend.open()
    record = reader.read_host("mig-1")
    assert record is not None and record.state == host
    assert [gpu.mig_fixed for gpu in record.state.gpus] == [True, False]
    scheduler = Scheduler(backend.open())
    assert scheduler.place(whole("w1")).claim.gpu_indexes == (1,)
    with pytest.raises(InsufficientCapacity):
        scheduler.place(whole("w2"))
    cut = scheduler.place(slice_of("m", "1g.10gb"))
    assert (cut.claim.gpu_indexes, cut.claim.mig_instance) == ((0,), 2)
    after = backend.open().snapshot()["mig-1"].state
    assert after.gpus[0].mig_fixed and after.gpus[0].mig_layout == layout
    assert sorted(claim.machine_id for claim in after.claims) == ["m", "w1"]
