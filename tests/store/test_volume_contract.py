"""The VolumeStore contract, over every backend (a new one joins ``VOLUME_BACKENDS``), and the
changes built on its compare-and-set: two machines racing for one volume from separate
handles on one store (as two agents would), exactly one wins; a delete cannot race an attach.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from hangar.errors import Conflict, NotFound
from hangar.model.volume import Volume, VolumeSnapshotRecord, VolumeState
from hangar.store.etcd.volumes import EtcdVolumeStore
from hangar.store.protocol import VolumeStore
from hangar.store.volume_claims import (
    attach_volume,
    attached_to,
    change_volume,
    detach_volume,
    forget_snapshot,
    move_volume,
    record_snapshot,
)
from hangar.store.volumes import SqliteVolumeStore
from hangar.volumes.model import new_volume_id
from tests.fixtures.etcd import StoreScratch

VOLUME_BACKENDS: dict[str, Callable[[StoreScratch], VolumeStore]] = {
    "sqlite": lambda scratch: SqliteVolumeStore(scratch.tmp / "db"),
    "etcd": lambda scratch: EtcdVolumeStore(scratch.etcd_client(), scratch.layout),
}
RACERS = 8
ROUNDS = 20


@pytest.fixture(params=sorted(VOLUME_BACKENDS))
def opener(
    request: pytest.FixtureRequest, store_scratch: StoreScratch
) -> Callable[[], VolumeStore]:
    """Opens another handle on the same store."""
    return lambda: VOLUME_BACKENDS[request.param](store_scratch)


def volume(app: str = "web", state: VolumeState = VolumeState.CREATED, at: float = 1.0) -> Volume:
    return Volume(
        id=new_volume_id(),
        name="data",
        app=app,
        region="local",
        host_id="h1",
        size_gb=1,
        state=state,
        snapshot_retention=5,
        created_at=at,
        updated_at=at,
    )


def test_records_list_and_compare_and_set(opener: Callable[[], VolumeStore]) -> None:
    store = opener()
    first, second, other = volume(at=1.0), volume(at=2.0), volume(app="api", at=3.0)
    for record in (second, first, other):
        store.insert_volume(record)
    with pytest.raises(Conflict):
        store.insert_volume(first)
    assert store.get_volume(first.id) == first
    assert [v.id for v in store.list_volumes("web")] == [first.id, second.id]
    assert [v.id for v in store.list_volumes(host_id="h1")] == [first.id, second.id, other.id]
    assert store.list_volumes(host_id="elsewhere") == []

    grown = first.model_copy(update={"size_gb": 2})
    assert store.compare_and_set_volume(grown)
    assert not store.compare_and_set_volume(grown), "a stale version is refused"
    stored = store.get_volume(first.id)
    assert stored is not None and (stored.size_gb, stored.version) == (2, 1)
    assert not store.compare_and_set_volume(volume()), "no record to set"

    move_volume(store, second.id, VolumeState.DESTROYED, 5.0, expected={VolumeState.CREATED})
    assert [v.id for v in store.list_volumes("web")] == [first.id]
    assert {v.id for v in store.list_volumes("web", include_destroyed=True)} == {
        first.id,
        second.id,
    }


def test_an_apps_destroyed_volumes_are_forgotten_with_it(
    opener: Callable[[], VolumeStore],
) -> None:
    store = opener()
    live, gone, other_gone = volume(at=1.0), volume(at=2.0), volume(app="api", at=3.0)
    for record in (live, gone, other_gone):
        store.insert_volume(record)
    for record in (gone, other_gone):
        move_volume(store, record.id, VolumeState.DESTROYED, 5.0, expected={VolumeState.CREATED})
    assert store.forget_volumes("web") == [gone.id]
    assert store.get_volume(gone.id) is None
    assert [v.id for v in store.list_volumes("web", include_destroyed=True)] == [live.id]
    assert store.get_volume(other_gone.id) is not None
    assert store.forget_volumes("web") == []


def test_attach_detach_and_moves(opener: Callable[[], VolumeStore]) -> None:
    store = opener()
    record = volume()
    store.insert_volume(record)
    attached = attach_volume(store, record.id, "m1", app="web", host_id="h1", now=2.0)
    assert attached.attached_machine_id == "m1" and attached.updated_at == 2.0
    assert attach_volume(store, record.id, "m1", app="web", host_id="h1", now=3.0) == attached
    with pytest.raises(Conflict, match="attached to machine m1"):
        attach_volume(store, record.id, "m2", app="web", host_id="h1", now=3.0)
    with pytest.raises(NotFound):
        attach_volume(store, record.id, "m2", app="api", host_id="h1", now=3.0)
    detach_volume(store, record.id, "m1", 3.0)
    with pytest.raises(Conflict, match="is on host h1"):
        attach_volume(store, record.id, "m2", app="web", host_id="h2", now=3.0)
    attach_volume(store, record.id, "m1", app="web", host_id="h1", now=3.0)
    assert [v.id for v in attached_to(store, "web", "m1")] == [record.id]
    with pytest.raises(Conflict, match="attached to machine m1"):
        move_volume(
            store,
            record.id,
            VolumeState.DESTROYING,
            4.0,
            expected={VolumeState.CREATED},
            detached_only=True,
        )
    detach_volume(store, record.id, "m2", 4.0)  # not m2's: nothing changes
    assert attached_to(store, "web", "m1")
    detach_volume(store, record.id, "m1", 4.0)
    assert attached_to(store, "web", "m1") == []
    move_volume(store, record.id, VolumeState.DESTROYING, 5.0, expected={VolumeState.CREATED})
    with pytest.raises(Conflict, match="destroying, not created"):
        attach_volume(store, record.id, "m1", app="web", host_id="h1", now=6.0)
    with pytest.raises(Conflict, match="cannot make it created"):
        move_volume(store, record.id, VolumeState.CREATED, 6.0, expected={VolumeState.FAILED})


def test_snapshot_records(opener: Callable[[], VolumeStore]) -> None:
    store = opener()
    record = volume()
    store.insert_volume(record)
    snap = VolumeSnapshotRecord(id="vs_0000000000000001", created_at=2.0, size_bytes=1 << 30)
    record_snapshot(store, record.id, snap, 2.0)
    record_snapshot(store, record.id, snap, 3.0)
    stored = store.get_volume(record.id)
    assert stored is not None and stored.snapshots == [snap]
    forget_snapshot(store, record.id, snap.id, 4.0)
    forget_snapshot(store, record.id, snap.id, 5.0)
    stored = store.get_volume(record.id)
    assert stored is not None and stored.snapshots == []
    with pytest.raises(NotFound):
        change_volume(store, "vol_0000000000000000", lambda v: v, 1.0)


def race(opener: Callable[[], VolumeStore], act: Callable[[VolumeStore, int], None]) -> None:
    """``act(handle, n)`` from RACERS threads at once, each with a handle of its own."""
    handles = [opener() for _ in range(RACERS)]
    barrier = threading.Barrier(RACERS)

    def run(n: int) -> None:
        barrier.wait()
        act(handles[n], n)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(RACERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_machines_racing_for_one_volume_exactly_one_wins(
    opener: Callable[[], VolumeStore],
) -> None:
    store = opener()
    for _ in range(ROUNDS):
        record = volume()
        store.insert_volume(record)
        winners: list[str] = []
        refused: list[str] = []

        def claim(
            handle: VolumeStore,
            n: int,
            volume_id: str = record.id,
            winners: list[str] = winners,
            refused: list[str] = refused,
        ) -> None:
            machine_id = f"m{n}"
            try:
                attach_volume(handle, volume_id, machine_id, app="web", host_id="h1", now=2.0)
            except Conflict:
                refused.append(machine_id)
            else:
                winners.append(machine_id)

        race(opener, claim)
        stored = store.get_volume(record.id)
        assert stored is not None
        assert len(winners) == 1 and len(refused) == RACERS - 1
        assert stored.attached_machine_id == winners[0]


def test_a_delete_and_attaches_racing_never_both_win(opener: Callable[[], VolumeStore]) -> None:
    store = opener()
    for _ in range(ROUNDS):
        record = volume()
        store.insert_volume(record)
        outcomes: list[str] = []

        def act(
            handle: VolumeStore,
            n: int,
            volume_id: str = record.id,
            outcomes: list[str] = outcomes,
        ) -> None:
            try:
                if n == 0:
                    move_volume(
                        handle,
                        volume_id,
                        VolumeState.DESTROYING,
                        2.0,
                        expected={VolumeState.CREATED},
                        detached_only=True,
                    )
                    outcomes.append("deleted")
                else:
                    attach_volume(handle, volume_id, f"m{n}", app="web", host_id="h1", now=2.0)
                    outcomes.append("attached")
            except Conflict:
                pass

        race(opener, act)
        stored = store.get_volume(record.id)
        assert stored is not None
        assert len(outcomes) == 1, outcomes
        if outcomes == ["deleted"]:
            assert stored.state is VolumeState.DESTROYING and stored.attached_machine_id is None
        else:
            assert stored.state is VolumeState.CREATED and stored.attached_machine_id
