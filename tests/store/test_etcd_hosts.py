"""Hosts registered under leases on a real etcd cluster: an agent that stops refreshing its
lease becomes unreachable within the lease TTL plus 5 s, as the API promises."""

from __future__ import annotations

import threading

from hangar.model.gpu import GpuRecord
from hangar.model.host import HostInfo
from hangar.store.etcd.client import EtcdClient
from hangar.store.etcd.hosts import HostLease, HostMonitor, HostRecord, HostStatus
from hangar.store.etcd.keys import KeyLayout

TTL_S = 2
GRACE_S = 5.0
"""The promise: unreachable within the TTL plus 5 s."""


def record(host_id: str, address: str = "http://127.0.0.1:1") -> HostRecord:
    return HostRecord(
        host=HostInfo(id=host_id, region="ord", pool="gpu", cpus=64, memory_mb=262_144),
        address=address,
        gpus=[GpuRecord(host_id=host_id, bdf="0000:17:00.0", kind="l40s")],
        started_at=1.0,
    )


def test_a_registered_host_is_seen_with_its_record(
    etcd_client: EtcdClient, etcd_layout: KeyLayout
) -> None:
    seen: list[tuple[str, HostStatus]] = []
    with (
        HostMonitor(
            etcd_client, etcd_layout, on_change=lambda h, s: seen.append((h, s))
        ) as monitor,
        HostLease(etcd_client, record("h1"), etcd_layout, ttl_s=TTL_S) as lease,
    ):
        assert monitor.wait_status("h1", HostStatus.OK, GRACE_S) is not None
        assert monitor.get("h1") == record("h1")
        assert monitor.status("h2") is HostStatus.UNREACHABLE
        moved = record("h1", address="http://127.0.0.1:2")
        lease.update(moved)
        assert monitor.wait_until(lambda: monitor.get("h1") == moved, GRACE_S)
        kv = etcd_client.get(etcd_layout.host("h1"))
        assert kv is not None and kv.lease == lease.lease_id, "updates keep the lease"
    assert ("h1", HostStatus.OK) in seen


def test_a_host_whose_agent_stops_is_unreachable_within_the_ttl_plus_grace(
    etcd_client: EtcdClient, etcd_layout: KeyLayout
) -> None:
    lost = threading.Event()
    monitor = HostMonitor(
        etcd_client,
        etcd_layout,
        on_change=lambda host, status: lost.set() if status is HostStatus.UNREACHABLE else None,
    ).start()
    lease = HostLease(etcd_client, record("h1"), etcd_layout, ttl_s=TTL_S).start()
    try:
        assert monitor.wait_status("h1", HostStatus.OK, GRACE_S) is not None
        lease.stop(revoke=False)  # the agent dies: nobody refreshes or revokes its lease
        waited = monitor.wait_status("h1", HostStatus.UNREACHABLE, TTL_S + GRACE_S)
        assert waited is not None, "still ok after the TTL plus 5 s"
        assert lost.wait(GRACE_S), "on_change runs just after the status it reports is seen"
        assert etcd_client.get(etcd_layout.host("h1")) is None
    finally:
        lease.stop()
        monitor.close()


def test_the_lease_is_refreshed_while_the_agent_runs(
    etcd_client: EtcdClient, etcd_layout: KeyLayout
) -> None:
    with HostLease(etcd_client, record("h1"), etcd_layout, ttl_s=TTL_S) as lease:
        # Refreshed every TTL / 3: six refreshes outlive the lease twice over.
        assert lease.wait_refreshes(6, 3 * TTL_S + GRACE_S)
        assert etcd_client.lease_ttl(lease.lease_id) > 0
        assert etcd_client.get(etcd_layout.host("h1")) is not None
        assert lease.alive and lease.registrations == 1


def test_a_lost_lease_is_replaced_and_the_host_registered_again(
    etcd_client: EtcdClient, etcd_layout: KeyLayout
) -> None:
    with (
        HostMonitor(etcd_client, etcd_layout) as monitor,
        HostLease(etcd_client, record("h1"), etcd_layout, ttl_s=TTL_S) as lease,
    ):
        first = lease.lease_id
        etcd_client.revoke_lease(first)  # as if etcd had expired it during a partition
        assert monitor.wait_status("h1", HostStatus.UNREACHABLE, GRACE_S) is not None
        assert monitor.wait_status("h1", HostStatus.OK, TTL_S + GRACE_S) is not None
        assert lease.registrations == 2 and lease.lease_id != first
