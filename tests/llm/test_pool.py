"""The replica pool's decisions, on a table of replicas and an injected clock: routing, waking
once for many waiters, failures, bounds, idle suspension. The gateway tests run the same
decisions against real llama-server processes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import pytest

from hangar.clock import ManualClock
from hangar.errors import BadGateway, InsufficientCapacity, ServiceUnavailable, VmmError
from hangar.llm.pool import PoolPolicy, ReplicaPool
from hangar.llm.seams import Deployment, Replica, ReplicaState

DEPLOYMENT = Deployment(id="d1", org="acme", name="m", min_replicas=0, max_replicas=2)


@dataclass
class ReplicaTable:
    """Replicas as rows; waking and sleeping change the row; ``healthy`` is what /health says."""

    rows: dict[str, Replica] = field(default_factory=dict)
    healthy: set[str] = field(default_factory=set)
    wake_error: Exception | None = None
    room: int = 0
    wakes: list[str] = field(default_factory=list)
    sleeps: list[str] = field(default_factory=list)
    wake_gate: asyncio.Event | None = None

    def add(self, replica_id: str, state: ReplicaState, healthy: bool = True) -> None:
        address = f"http://127.0.0.1:{9000 + len(self.rows)}"
        self.rows[replica_id] = Replica(replica_id, DEPLOYMENT.id, address, state)
        if healthy:
            self.healthy.add(address)

    async def list(self, deployment: Deployment) -> Sequence[Replica]:
        return list(self.rows.values())

    async def wake(self, replica: Replica) -> Replica:
        self.wakes.append(replica.id)
        if self.wake_gate is not None:
            await self.wake_gate.wait()
        if self.wake_error is not None:
            raise self.wake_error
        self.rows[replica.id] = replace(replica, state=ReplicaState.STARTED)
        return self.rows[replica.id]

    async def sleep(self, replica: Replica) -> None:
        self.sleeps.append(replica.id)
        self.rows[replica.id] = replace(replica, state=ReplicaState.SUSPENDED)

    async def scale_out(self, deployment: Deployment) -> Replica:
        if self.room <= 0:
            raise InsufficientCapacity("no host has room")
        self.room -= 1
        self.add(f"new{len(self.rows)}", ReplicaState.STOPPED)
        return list(self.rows.values())[-1]

    async def probe(self, address: str) -> bool:
        return address in self.healthy


async def settle() -> None:
    """Let every ready task run until it waits on something."""
    for _ in range(10):
        await asyncio.sleep(0)


def make_pool(
    table: ReplicaTable,
    clock: ManualClock,
    deployment: Deployment = DEPLOYMENT,
    **policy: float,
) -> ReplicaPool:
    return ReplicaPool(deployment, table, table.probe, clock, PoolPolicy(**policy))  # type: ignore[arg-type]


async def test_requests_go_to_the_replica_with_fewest_in_flight() -> None:
    table = ReplicaTable()
    table.add("a", ReplicaState.STARTED)
    table.add("b", ReplicaState.STARTED)
    pool = make_pool(table, ManualClock())
    leases = [await pool.acquire() for _ in range(4)]
    assert sorted(lease.replica.id for lease in leases) == ["a", "a", "b", "b"]
    leases[0].release()
    leases[0].release()  # twice is once
    assert (await pool.acquire()).replica.id == leases[0].replica.id
    assert pool.in_flight() == {"a": 2, "b": 2}


async def test_many_waiters_share_one_wake_and_a_stopped_replica_waits_for_health() -> None:
    clock = ManualClock()
    table = ReplicaTable(wake_gate=asyncio.Event())
    table.add("s", ReplicaState.SUSPENDED, healthy=False)
    pool = make_pool(table, clock, health_interval_s=1.0)
    waiters = [asyncio.create_task(pool.acquire()) for _ in range(3)]
    await settle()
    assert table.wakes == ["s"] and pool.waiting == 3
    table.wake_gate.set()  # type: ignore[union-attr]
    await settle()
    assert not any(w.done() for w in waiters), "served before /health answered"
    table.healthy.add(table.rows["s"].address)
    clock.advance(1.0)
    leases = await asyncio.gather(*waiters)
    assert {lease.replica.id for lease in leases} == {"s"} and table.wakes == ["s"]


async def test_a_failed_wake_is_a_502_for_its_waiters_and_a_503_until_retry() -> None:
    clock = ManualClock()
    table = ReplicaTable(wake_error=VmmError("qemu exited 1"))
    table.add("s", ReplicaState.STOPPED)
    pool = make_pool(table, clock, retry_after_s=5.0)
    with pytest.raises(BadGateway, match="qemu exited 1"):
        await pool.acquire()
    with pytest.raises(BadGateway):
        await pool.acquire()
    assert table.wakes == ["s"], "no second try before retry_after_s"
    clock.advance(5.0)
    table.wake_error = InsufficientCapacity("the host is full")
    with pytest.raises(ServiceUnavailable, match="the host is full") as full:
        await pool.acquire()
    assert full.value.retry_after_s == 5.0 and table.wakes == ["s", "s"]


async def test_a_queue_past_the_threshold_adds_a_replica_up_to_max() -> None:
    clock = ManualClock()
    table = ReplicaTable(room=5)
    table.add("a", ReplicaState.STARTED)
    one_each = replace(DEPLOYMENT, concurrency=1, max_replicas=2)
    pool = make_pool(table, clock, one_each, queue_threshold=1)
    first = await pool.acquire()
    second = asyncio.create_task(pool.acquire())
    await settle()
    assert table.room == 5, "one waiting request is within the threshold"
    third = asyncio.create_task(pool.acquire())
    await settle()
    assert table.room == 4 and table.wakes == ["new1"]
    served = await third if third.done() else await second
    assert served.replica.id == "new1"
    fourth = asyncio.create_task(pool.acquire())
    fifth = asyncio.create_task(pool.acquire())
    await settle()
    assert table.room == 4, "max_replicas=2 reached"
    first.release()
    pending = {task for task in (second, third, fourth, fifth) if not task.done()}
    done, still = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    assert [task.result().replica.id for task in done] == ["a"] and len(still) == 2
    for task in still:
        task.cancel()


async def test_bounded_queue_and_wait() -> None:
    clock = ManualClock()
    table = ReplicaTable()
    table.add("a", ReplicaState.STARTED)
    busy = replace(DEPLOYMENT, concurrency=1, max_replicas=1)
    pool = make_pool(table, clock, busy, max_queue=1, queue_timeout_s=10.0)
    await pool.acquire()
    queued = asyncio.create_task(pool.acquire())
    await settle()
    with pytest.raises(ServiceUnavailable, match="too many requests"):
        await pool.acquire()
    clock.advance(10.0)
    with pytest.raises(ServiceUnavailable, match="in time"):
        await queued
    assert pool.waiting == 0


async def test_no_replica_and_no_room_is_unavailable_at_once() -> None:
    pool = make_pool(ReplicaTable(), ManualClock())
    with pytest.raises(ServiceUnavailable, match="no host has room"):
        await pool.acquire()
    empty = make_pool(ReplicaTable(), ManualClock(), replace(DEPLOYMENT, max_replicas=0))
    with pytest.raises(ServiceUnavailable, match="no replica that can start"):
        await empty.acquire()


async def test_idle_replicas_sleep_down_to_min_and_min_is_kept_awake() -> None:
    clock = ManualClock()
    table = ReplicaTable()
    for name in ("a", "b", "c"):
        table.add(name, ReplicaState.STARTED)
    keep_one = replace(DEPLOYMENT, min_replicas=1, max_replicas=3)
    pool = make_pool(table, clock, keep_one, idle_s=60.0)
    lease = await pool.acquire()
    clock.advance(59.0)
    await pool.reconcile()
    assert table.sleeps == []
    clock.advance(1.0)
    await pool.reconcile()
    assert len(table.sleeps) == 2 and lease.replica.id not in table.sleeps, "busy one stays"
    lease.release()
    clock.advance(60.0)
    await pool.reconcile()
    assert len(table.sleeps) == 2, "min_replicas=1 stays awake"

    table.rows[lease.replica.id] = replace(table.rows[lease.replica.id], state=ReplicaState.STOPPED)
    await pool.reconcile()
    await settle()
    assert table.wakes, "below min_replicas: one is woken"


async def test_light_load_stays_on_one_replica_so_the_spare_can_sleep() -> None:
    clock = ManualClock()
    table = ReplicaTable()
    table.add("a", ReplicaState.STARTED)
    table.add("b", ReplicaState.STARTED)
    pool = make_pool(table, clock, idle_s=30.0)
    used = set()
    for _ in range(5):
        lease = await pool.acquire()
        used.add(lease.replica.id)
        clock.advance(10.0)
        lease.release()
    assert len(used) == 1
    await pool.reconcile()
    assert table.sleeps == sorted({"a", "b"} - used)
