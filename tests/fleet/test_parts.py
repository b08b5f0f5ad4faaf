"""The fleet's parts in one process over the session's real etcd: the placer (reachable,
uncordoned hosts only; the pool rules; a machine that does not launch claims nothing), the
work queue and an agent's intake (idempotent, only its own host's runs), the run board."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hangar.agent.steps import new_run
from hangar.errors import InsufficientCapacity, InvalidRequest
from hangar.fleet.board import RunBoard
from hangar.fleet.cordons import Cordon, Cordons
from hangar.fleet.invariants import fleet_violations
from hangar.fleet.placer import FleetPlacer
from hangar.fleet.stores import open_fleet_stores
from hangar.fleet.work import WorkIntake, WorkQueue
from hangar.model.config import GuestConfig, MachineConfig
from hangar.model.host import HostInfo
from hangar.model.machine import Machine, MachineState
from hangar.model.run import RunRecord, RunStatus, StartRequest
from hangar.scheduler import Claim, InMemoryClaimStore
from hangar.settings import Settings
from hangar.store.etcd.claims import EtcdClaimStore
from hangar.store.etcd.client import EtcdClient
from hangar.store.etcd.hosts import HostLease, HostMonitor, HostRecord, HostStatus
from hangar.store.etcd.keys import KeyLayout
from hangar.store.etcd.local import LocalEtcdCluster
from hangar.store.etcd.sealed import Sealer
from hangar.store.machines import SqliteMachineStore
from tests.scheduler.fleet import general_host, gpu_host

TTL_S = 2
WAIT_S = 10.0


@pytest.fixture
def claims(etcd_client: EtcdClient, etcd_layout: KeyLayout) -> Iterator[EtcdClaimStore]:
    store = EtcdClaimStore(etcd_client, etcd_layout).start()
    yield store
    store.close()


@pytest.fixture
def monitor(etcd_client: EtcdClient, etcd_layout: KeyLayout) -> Iterator[HostMonitor]:
    with HostMonitor(etcd_client, etcd_layout) as hosts:
        yield hosts


def lease(client: EtcdClient, layout: KeyLayout, host_id: str, pool: str) -> HostLease:
    record = HostRecord(host=HostInfo(id=host_id, region="ord", cpus=64, memory_mb=1 << 18))
    return HostLease(client, record.model_copy(update={"pool": pool}), layout, ttl_s=TTL_S)


def config(gpus: int = 0) -> MachineConfig:
    guest = (
        GuestConfig(cpu_kind="performance", cpus=1, gpus=gpus, gpu_kind="l40s")
        if gpus
        else GuestConfig(cpus=1, memory_mb=256)
    )
    return MachineConfig(image="x", guest=guest)


def test_placer_uses_only_reachable_uncordoned_hosts_and_the_pool_rules(
    etcd_client: EtcdClient,
    etcd_layout: KeyLayout,
    claims: EtcdClaimStore,
    monitor: HostMonitor,
) -> None:
    claims.put_host(general_host("cpu-1"))
    claims.put_host(general_host("cpu-2"))
    claims.put_host(gpu_host("gpu-1", kind="l40s", gpus=1, allow_cpu_machines=False))
    cordons = Cordons(etcd_client, etcd_layout)
    cordons.start()
    placer = FleetPlacer(claims, monitor, cordons.is_cordoned)
    try:
        with (
            lease(etcd_client, etcd_layout, "cpu-1", "general") as first,
            lease(etcd_client, etcd_layout, "gpu-1", "gpu"),
        ):
            assert monitor.wait_until(lambda: len(monitor.hosts()) == 2, WAIT_S)
            # cpu-2 has a claim record but no live lease: never chosen
            for number in range(4):
                host, _region = placer.place(f"m{number}", None, config(), launching=True)
                assert host == "cpu-1"  # CPU machines never on the GPU pool
            assert placer.place("g1", None, config(gpus=1), launching=True)[0] == "gpu-1"
            with pytest.raises(InsufficientCapacity):
                placer.place("g2", None, config(gpus=1), launching=True)
            cordons.cordon(Cordon(host_id="cpu-1", by="test", at=1.0))
            with pytest.raises(InsufficientCapacity):
                placer.place("m9", None, config(), launching=True)
            cordons.uncordon("cpu-1")
            assert placer.place("m9", None, config(), launching=False)[0] == "cpu-1"
            record = claims.read_host("cpu-1")
            assert record is not None
            assert "m9" not in {claim.machine_id for claim in record.state.claims}
            first.stop(revoke=False)  # as if its agent died: gone after the TTL
            assert monitor.wait_status("cpu-1", HostStatus.UNREACHABLE, TTL_S + 5) is not None
            assert placer.host_status("cpu-1") == "unreachable"
            with pytest.raises(InsufficientCapacity):
                placer.place("m10", None, config(), launching=True)
    finally:
        cordons.close()


def test_work_is_taken_in_once_and_only_by_its_host(
    etcd_client: EtcdClient, etcd_layout: KeyLayout
) -> None:
    queue = WorkQueue(etcd_client, etcd_layout)
    mine = new_run("m-here", StartRequest(), 1.0)
    stray = new_run("m-elsewhere", StartRequest(), 2.0)
    assert queue.submit("h1", mine)
    assert not queue.submit("h1", mine)  # a repeated submit adds nothing
    assert queue.submit("h1", stray)
    assert queue.pending("h1", "m-here")
    accepted: list[RunRecord] = []
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    intake = WorkIntake(
        etcd_client,
        queue,
        "h1",
        lambda run: run.machine_id == "m-here",
        accepted.append,
        loop,
    )
    intake.start()
    try:
        deadline_ok = threading.Event()

        def drained() -> bool:
            return not queue.pending("h1", "m-here") and not queue.pending("h1", "m-elsewhere")

        for _ in range(200):
            if drained():
                deadline_ok.set()
                break
            deadline_ok.wait(0.05)
        assert deadline_ok.is_set()
        assert [run.id for run in accepted] == [mine.id]
    finally:
        intake.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()


def test_the_board_keeps_the_newest_runs_and_says_whether_one_is_unfinished(
    etcd_client: EtcdClient, etcd_layout: KeyLayout
) -> None:
    board = RunBoard(etcd_client, etcd_layout)
    done = new_run("m1", StartRequest(), 1.0)
    done.status = RunStatus.SUCCEEDED
    running = new_run("m1", StartRequest(), 2.0)
    board.publish("h1", "m1", [done, running])
    entry = board.read("h1", "m1")
    assert entry is not None and entry.unfinished
    assert [run.id for run in entry.runs] == [done.id, running.id]
    running.status = RunStatus.FAILED
    board.publish("h1", "m1", [done, running])
    entry = board.read("h1", "m1")
    assert entry is not None and not entry.unfinished
    assert board.read("h1", "other") is None


def test_a_replica_with_another_sealing_key_is_refused(
    etcd_cluster: LocalEtcdCluster, etcd_layout: KeyLayout, tmp_path: Path
) -> None:
    def settings(name: str) -> Settings:
        return Settings(
            home=tmp_path / name,
            etcd=tuple(etcd_cluster.endpoints),
            etcd_prefix=etcd_layout.prefix,
            etcd_key_file=Sealer.create_key_file(tmp_path / f"{name}.key"),
        )

    first = open_fleet_stores(settings("first"))
    first.close()
    with pytest.raises(InvalidRequest) as refused:
        open_fleet_stores(settings("second"))
    assert refused.value.fields["field"] == "etcd_key_file"


def test_the_invariants_name_what_is_broken(tmp_path: Path) -> None:
    machines = SqliteMachineStore(tmp_path / "db")
    claims = InMemoryClaimStore()
    claims.put_host(general_host("h1"))
    claims.put_host(general_host("h2"))

    def machine(machine_id: str, host_id: str) -> Machine:
        return Machine(
            id=machine_id,
            name=machine_id,
            app="web",
            state=MachineState.CREATED,
            region="ord",
            instance_id="i",
            version=1,
            config=MachineConfig(image="x"),
            created_at=1.0,
            updated_at=1.0,
            host_id=host_id,
        )

    machines.insert_machine(machine("ok", "h1"))
    assert fleet_violations(machines, claims) == []
    machines.insert_machine(machine("lost", "h9"))
    for host_id in ("h1", "h2"):
        record = claims.read_host(host_id)
        assert record is not None
        with_claims = record.state.with_claim(Claim("ok", 1000, 64))
        if host_id == "h2":
            with_claims = with_claims.with_claim(Claim("ghost", 1000, 64))
        assert claims.compare_and_set(host_id, record.version, with_claims)
    problems = fleet_violations(machines, claims)
    assert any("lost has no known host" in p for p in problems)
    assert any("claim of ok on h2 has no owner" in p for p in problems)
    assert any("claim of ghost on h2" in p for p in problems)
    assert any("ok holds claims on 2 hosts" in p for p in problems)
