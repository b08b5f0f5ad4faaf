"""etcd faults on a cluster of the test's own: one member stopped (service continues), two
stopped (quorum lost: a typed, retryable ``StoreUnavailable`` within the client's timeout,
nothing half written, cached reads still answer), then recovery when they come back."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from hangar.errors import InsufficientCapacity, StoreUnavailable
from hangar.scheduler import Placement, Scheduler
from hangar.store.etcd.claims import EtcdClaimStore
from hangar.store.etcd.client import EtcdClient
from hangar.store.etcd.hosts import HostLease, HostMonitor, HostStatus
from hangar.store.etcd.keys import KeyLayout
from hangar.store.etcd.local import LocalEtcdCluster
from tests.scheduler.fleet import gpu_host, whole
from tests.scheduler.test_claims import assert_each_gpu_held_once
from tests.store.test_etcd_hosts import record

TIMEOUT_S = 2.0
SLACK_S = 5.0
"""The bound checked is the client's timeout; the slack only absorbs a loaded machine."""
WAIT_S = 20.0
LAYOUT = KeyLayout("/fleet")


@pytest.fixture
def client(own_etcd_cluster: LocalEtcdCluster) -> Iterator[EtcdClient]:
    client = EtcdClient(own_etcd_cluster.endpoints, timeout_s=TIMEOUT_S)
    yield client
    client.close()


@pytest.fixture
def store(client: EtcdClient) -> Iterator[EtcdClaimStore]:
    store = EtcdClaimStore(client, LAYOUT)
    for n in range(4):
        store.put_host(gpu_host(f"gpu-{n}", gpus=4))
    with store:
        yield store


def claimed(client: EtcdClient) -> dict[str, str]:
    """Machine -> host, read from etcd (an unstarted store reads etcd, not a cache)."""
    fresh = EtcdClaimStore(client, LAYOUT).snapshot()
    return {c.machine_id: r.state.id for r in fresh.values() for c in r.state.claims}


def test_with_one_member_stopped_placement_and_watches_go_on(
    own_etcd_cluster: LocalEtcdCluster, client: EtcdClient, store: EtcdClaimStore
) -> None:
    scheduler = Scheduler(store)
    monitor = HostMonitor(client, LAYOUT).start()
    try:
        assert isinstance(scheduler.place(whole("before")), Placement)
        own_etcd_cluster.stop_member(0)  # the member both the client and the watches use first
        placed = scheduler.place_many([whole(f"m{n}") for n in range(5)])
        assert all(isinstance(answer, Placement) for answer in placed)
        with HostLease(client, record("agent-1"), LAYOUT, ttl_s=2):
            assert monitor.wait_status("agent-1", HostStatus.OK, WAIT_S) is not None
        latest = client.get(LAYOUT.claim(placed[-1].host_id))  # type: ignore[union-attr]
        assert latest is not None and store.cache.wait_revision(latest.mod_revision, WAIT_S)
        cached = {c.machine_id for r in store.snapshot().values() for c in r.state.claims}
        assert cached == {"before", *(f"m{n}" for n in range(5))}
    finally:
        monitor.close()


def test_quorum_lost_answers_unavailable_fast_then_everything_converges(
    own_etcd_cluster: LocalEtcdCluster, client: EtcdClient, store: EtcdClaimStore
) -> None:
    scheduler = Scheduler(store)
    monitor = HostMonitor(client, LAYOUT).start()
    lease = HostLease(client, record("agent-1"), LAYOUT, ttl_s=3).start()
    try:
        assert isinstance(scheduler.place(whole("before")), Placement)
        assert monitor.wait_status("agent-1", HostStatus.OK, WAIT_S) is not None
        index_before = {e.state.id: (e.state, e.version) for e in scheduler.index.entries()}
        own_etcd_cluster.stop_member(1)
        own_etcd_cluster.stop_member(2)

        failures: dict[str, StoreUnavailable] = {}
        for attempt in range(5):  # until the last member notices it has no leader (~1 s)
            machine = f"during-{attempt}"
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as raised:
                scheduler.place(whole(machine))
            assert time.monotonic() - started < TIMEOUT_S + SLACK_S
            failures[machine] = raised.value
            if not raised.value.outcome_unknown:
                break
        error = list(failures.values())[-1]
        assert error.retryable and error.http_status == 503 and error.code == "store_unavailable"
        assert not error.outcome_unknown, "a member without a leader refuses at once"
        with pytest.raises(StoreUnavailable):
            scheduler.place_many([whole("batch-1"), whole("batch-2")])
        after = {e.state.id: (e.state, e.version) for e in scheduler.index.entries()}
        assert after == index_before, "a failed batch leaves the scheduler's index as it was"

        # Reads of cached state still answer.
        assert len(store.snapshot()) == 4
        assert monitor.status("agent-1") is HostStatus.OK
        assert client.get(LAYOUT.claim("gpu-0"), serializable=True) is not None

        own_etcd_cluster.start_member(1)
        own_etcd_cluster.start_member(2)
        own_etcd_cluster.wait_healthy(WAIT_S)

        deadline = time.monotonic() + WAIT_S
        while True:  # the first writes after an election may still find no leader
            try:
                retried = scheduler.place(whole("after"))
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "etcd did not come back"
        assert isinstance(retried, Placement)
        now = claimed(client)
        for machine, failure in failures.items():
            if not failure.outcome_unknown:
                assert machine not in now, f"{machine} was refused but written"
        assert {"before", "after"} <= set(now)
        assert "batch-1" not in now and "batch-2" not in now
        fresh = EtcdClaimStore(client, LAYOUT).snapshot()
        assert assert_each_gpu_held_once(fresh) == len(now)
        revision = client.get(LAYOUT.claim(retried.host_id))
        assert revision is not None and store.cache.wait_revision(revision.mod_revision, WAIT_S)
        assert store.snapshot() == fresh, "the watch-fed cache converged"
        assert lease.wait_refreshes(lease.refreshes + 1, WAIT_S) and lease.alive
        assert monitor.status("agent-1") is HostStatus.OK
        with pytest.raises(InsufficientCapacity):
            scheduler.place(whole("too-big", gpus=8))
    finally:
        lease.stop()
        monitor.close()
