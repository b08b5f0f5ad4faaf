"""Placement and claim are one step: racing schedulers never both win a GPU."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping

import pytest

from hangar.errors import InsufficientCapacity, StoreError
from hangar.scheduler import HostState, InMemoryClaimStore, Placement, Scheduler, VersionedHost
from hangar.scheduler.scheduler import BACKOFF_S, MAX_BACKOFF_S, REFRESH_AFTER_LOSSES
from tests.scheduler.fleet import gpu_host, whole


class CountingStore(InMemoryClaimStore):
    """The in-memory store, counting lost compare-and-sets."""

    def __init__(self, hosts: list[HostState]) -> None:
        super().__init__(hosts)
        self.lost = 0
        self._count_lock = threading.Lock()

    def compare_and_set(self, host_id: str, expected_version: int, new_state: HostState) -> bool:
        won = super().compare_and_set(host_id, expected_version, new_state)
        if not won:
            with self._count_lock:
                self.lost += 1
        return won


def assert_each_gpu_held_once(snapshot: Mapping[str, VersionedHost]) -> int:
    holders: Counter[tuple[str, int]] = Counter()
    for record in snapshot.values():
        for claim in record.state.claims:
            for index in claim.gpu_indexes:
                holders[(record.state.id, index)] += 1
        assert all(used <= 1000 for used in record.state.gpu_used_milli)
    assert all(count == 1 for count in holders.values())
    return len(holders)


def test_a_stale_scheduler_loses_the_last_gpu_and_reports_no_capacity() -> None:
    store = CountingStore([gpu_host("gpu-1", gpus=1)])
    first, second = Scheduler(store), Scheduler(store)
    first.place(whole("m1"))
    with pytest.raises(InsufficientCapacity):
        second.place(whole("m2"))
    assert store.lost == 1
    assert assert_each_gpu_held_once(store.snapshot()) == 1


def test_a_stale_scheduler_that_loses_a_race_places_elsewhere() -> None:
    store = CountingStore([gpu_host("gpu-1", gpus=1), gpu_host("gpu-2", gpus=1)])
    first, second = Scheduler(store), Scheduler(store)
    winner = first.place(whole("m1")).host_id
    loser = second.place(whole("m2")).host_id
    assert {winner, loser} == {"gpu-1", "gpu-2"}
    assert store.lost == 1


def test_a_stale_scheduler_releases_a_claim_another_one_made() -> None:
    """A fleet's API replica claims at create; the host's agent, whose view predates that
    claim, releases it when the machine stops or is destroyed."""
    store = CountingStore([gpu_host("gpu-1", gpus=1)])
    agent, replica = Scheduler(store), Scheduler(store)
    assert agent.index.get("gpu-1") is not None  # loaded before the claim
    replica.place(whole("m1"))
    agent.release("gpu-1", "m1")
    record = store.read_host("gpu-1")
    assert record is not None and record.state.claims == ()
    agent.release("gpu-1", "m1")  # nothing left: a no-op
    assert store.lost == 0


def test_many_racing_schedulers_win_exactly_as_many_gpus_as_there_are() -> None:
    hosts = [gpu_host(f"gpu-{n}", gpus=2) for n in range(4)]
    store = CountingStore(hosts)
    threads_count, per_thread = 8, 4
    schedulers = [Scheduler(store) for _ in range(threads_count)]  # all from one snapshot
    start = threading.Barrier(threads_count)
    wins: list[str] = []
    refusals: list[str] = []
    record_lock = threading.Lock()

    def run(number: int) -> None:
        start.wait()
        for attempt in range(per_thread):
            machine = f"m-{number}-{attempt}"
            try:
                schedulers[number].place(whole(machine, cpu=1))
                outcome = wins
            except InsufficientCapacity:
                outcome = refusals
            with record_lock:
                outcome.append(machine)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(wins) == 8
    assert len(refusals) == threads_count * per_thread - 8
    assert store.lost > 0
    snapshot = store.snapshot()
    assert assert_each_gpu_held_once(snapshot) == 8
    claimed = sorted(c.machine_id for r in snapshot.values() for c in r.state.claims)
    assert claimed == sorted(wins)


def test_compare_and_set_bumps_the_version_by_one() -> None:
    store = InMemoryClaimStore([gpu_host("gpu-1")])
    record = store.read_host("gpu-1")
    assert record is not None and record.version == 1
    assert not store.compare_and_set("gpu-1", 2, record.state)
    assert store.compare_and_set("gpu-1", 1, record.state)
    updated = store.read_host("gpu-1")
    assert updated is not None and updated.version == 2
    with pytest.raises(ValueError):
        store.compare_and_set("gpu-1", 2, gpu_host("other"))


class AlwaysOvertakenStore(InMemoryClaimStore):
    """Another writer changes the host just before every compare-and-set lands."""

    def compare_and_set(self, host_id: str, expected_version: int, new_state: HostState) -> bool:
        current = self.read_host(host_id)
        assert current is not None
        self.put_host(current.state)
        return super().compare_and_set(host_id, expected_version, new_state)


def test_a_placement_that_keeps_losing_backs_off_then_gives_up() -> None:
    pauses: list[float] = []
    scheduler = Scheduler(AlwaysOvertakenStore([gpu_host("gpu-1")]), sleep=pauses.append)
    with pytest.raises(StoreError):
        scheduler.place(whole("m1"))
    assert len(pauses) == 6, "no pause before the first two tries"
    ceilings = [min(MAX_BACKOFF_S, BACKOFF_S * 2**n) for n in range(6)]
    assert all(0 <= pause <= ceiling for pause, ceiling in zip(pauses, ceilings, strict=True))
    assert scheduler.stats.lost_races == 8
    assert scheduler.stats.refreshes == 8 - (REFRESH_AFTER_LOSSES - 1), "then the whole fleet"


def test_a_batch_retry_avoids_the_host_that_just_changed_then_gives_up() -> None:
    pauses: list[float] = []
    scheduler = Scheduler(AlwaysOvertakenStore([gpu_host("gpu-1")]), sleep=pauses.append)
    (answer,) = scheduler.place_many([whole("m1")])
    assert isinstance(answer, StoreError) and answer.fields["attempts"] == 8
    # Every other round the only host sits out (nothing to write); the last round sees it.
    assert scheduler.stats.lost_races == 5
    assert len(pauses) == 6


def test_a_batch_retry_lands_elsewhere_rather_than_on_the_contested_host() -> None:
    store = CountingStore([gpu_host("gpu-1", gpus=2), gpu_host("gpu-2", gpus=2)])
    first, second = Scheduler(store), Scheduler(store)
    contested = first.place(whole("m1")).host_id
    (answer,) = second.place_many([whole("m2")])
    assert isinstance(answer, Placement) and answer.host_id != contested
    assert store.lost == 1


def test_a_scheduler_that_keeps_losing_rereads_the_whole_fleet() -> None:
    hosts = REFRESH_AFTER_LOSSES + 2
    store = CountingStore([gpu_host(f"gpu-{n}", gpus=1) for n in range(hosts)])
    busy, stale = Scheduler(store), Scheduler(store)
    taken = {busy.place(whole(f"busy-{n}")).host_id for n in range(hosts - 1)}
    late = stale.place(whole("late"))
    assert late.host_id not in taken
    assert store.lost == REFRESH_AFTER_LOSSES and stale.stats.refreshes == 1
    assert assert_each_gpu_held_once(store.snapshot()) == hosts
