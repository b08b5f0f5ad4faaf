"""Usage and LLM records across a fleet, in one process over the session's real etcd (nothing
booted): two hosts' agents meter into their own SQLite and their publishers' threads copy it
to etcd, where a replica's stores (opened as ``hangar api --etcd`` opens them) read both; a
replica's LLM deployments are seen by every other replica."""

from __future__ import annotations

import time
from pathlib import Path

from hangar.clock import ManualClock
from hangar.fleet.stores import FleetStores, open_fleet_stores
from hangar.fleet.usage import UsagePublisher
from hangar.model.usage import UsageInterval, UsageSubject
from hangar.settings import Settings
from hangar.store.etcd.keys import KeyLayout
from hangar.store.etcd.local import LocalEtcdCluster
from hangar.store.etcd.sealed import Sealer
from hangar.store.usage import SqliteUsageStore
from tests.store.test_llm_contract import deployment

WAIT_S = 10.0


def opened(settings: Settings, tokens: bool) -> FleetStores:
    return open_fleet_stores(settings, tokens=tokens)


def machine_interval(host: str, machine_id: str, started_at: float) -> UsageInterval:
    return UsageInterval(
        id=f"{machine_id}.1.1",
        subject=UsageSubject.MACHINE,
        org="acme",
        app="web",
        machine_id=machine_id,
        host=host,
        region="local",
        cpu_kind="shared",
        cpus=1,
        memory_mb=256,
        started_at=started_at,
        until=started_at,
    )


def test_replicas_read_what_every_host_metered_and_share_deployments(
    etcd_cluster: LocalEtcdCluster, etcd_layout: KeyLayout, tmp_path: Path
) -> None:
    key_file = Sealer.create_key_file(tmp_path / "fleet.key")

    def settings(name: str, key: bool) -> Settings:
        return Settings(
            home=tmp_path / name,
            etcd=tuple(etcd_cluster.endpoints),
            etcd_prefix=etcd_layout.prefix,
            etcd_key_file=key_file if key else None,
        )

    replicas = [opened(settings(f"api{n}", True), tokens=True) for n in (1, 2)]
    clock = ManualClock(start=1000.0)
    publishers = []
    for host in ("h1", "h2"):
        agent_fleet = opened(settings(host, False), tokens=False)
        assert agent_fleet.llm is None, "an agent without the fleet's key holds no LLM store"
        local = SqliteUsageStore(tmp_path / f"{host}.db")
        local.open_interval(machine_interval(host, f"m-{host}", 1000.0))
        local.checkpoint([f"m-{host}.1.1"], 1060.0)
        publisher = UsagePublisher(agent_fleet.usage, local, host, clock, period_s=0.05)
        publisher.start()
        publishers.append((publisher, agent_fleet, local))
    try:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            found = replicas[0].usage.intervals("acme", 1000.0, 2000.0)
            if len(found) == 2:
                break
            time.sleep(0.05)
        assert {(i.host, i.until) for i in found} == {("h1", 1060.0), ("h2", 1060.0)}
        assert sum(i.seconds_within(1000.0, 2000.0) for i in found) == 120.0

        first, second = (replica.llm for replica in replicas)
        assert first is not None and second is not None
        first.insert_deployment(deployment("acme", "tiny", "dep_1"))
        named = second.deployment_named("acme", "tiny")
        assert named is not None and named.id == "dep_1"
    finally:
        for publisher, agent_fleet, local in publishers:
            publisher.close()
            agent_fleet.close()
            local.close()
        for replica in replicas:
            replica.close()
    assert all(publisher.cycles >= 2 for publisher, _, _ in publishers), "a last cycle at close"
