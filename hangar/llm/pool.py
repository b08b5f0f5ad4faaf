"""One deployment's replicas as the gateway sees them: which serves next, which wakes, which sleeps.

A request leases the ready replica with the fewest requests in flight (each replica takes at
most ``Deployment.concurrency`` at once). With none ready, it waits in a bounded queue while the
pool brings one up: resumes a suspended replica, starts a stopped one, or, when more requests
wait than ``queue_threshold``, adds one through ``Replicas.scale_out`` up to
``max_replicas``; a replica serves only once its health endpoint has answered. ``reconcile``
suspends replicas idle for ``idle_s`` down to ``min_replicas`` and wakes replicas up to it.
All time comes from the injected clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from hangar.clock import Clock
from hangar.errors import BadGateway, HangarError, InsufficientCapacity, ServiceUnavailable
from hangar.llm.seams import Deployment, Replica, Replicas, ReplicaState
from hangar.vmm.deadline import run_with_deadline

log = logging.getLogger(__name__)

HealthProbe = Callable[[str], Awaitable[bool]]
"""Whether the engine at an address (``http://HOST:PORT``) answers its health endpoint now."""

_SCALE_OUT = "+scale-out"
_SERVING_STATES = (ReplicaState.STARTED, ReplicaState.STARTING)
_WAKEABLE_STATES = (ReplicaState.SUSPENDED, ReplicaState.STOPPED)


@dataclass(frozen=True)
class PoolPolicy:
    queue_threshold: int = 2  # add a replica when more requests than this wait
    max_queue: int = 256  # requests one deployment may hold waiting; past it 503
    queue_timeout_s: float = 180.0  # how long a request waits for a replica; then 503
    wake_timeout_s: float = 120.0  # how long a woken replica has to answer its health check
    health_interval_s: float = 0.1
    idle_s: float = 300.0  # a replica idle this long is suspended (down to min_replicas)
    retry_after_s: float = 5.0  # what a 503 tells the client


class Lease:
    """One request's hold on one replica; ``release`` it exactly once."""

    def __init__(self, pool: ReplicaPool, replica: Replica) -> None:
        self.replica = replica
        self._pool = pool
        self._released = False

    def release(self, *, failed: bool = False) -> None:
        """Give the slot back; ``failed`` when the replica broke off, so it is checked again
        before it serves the next request."""
        if not self._released:
            self._released = True
            self._pool._release(self.replica, failed)


class ReplicaPool:
    def __init__(
        self,
        deployment: Deployment,
        replicas: Replicas,
        probe: HealthProbe,
        clock: Clock,
        policy: PoolPolicy,
    ) -> None:
        self.deployment = deployment
        self._replicas = replicas
        self._probe = probe
        self._clock = clock
        self._policy = policy
        self._in_flight: dict[str, int] = {}
        self._last_active: dict[str, float] = {}
        self._ready: dict[str, str] = {}  # replica id -> the address its health check answered
        self._sleeping: set[str] = set()
        self._growing: dict[str, asyncio.Task[None]] = {}
        self._failure: HangarError | None = None  # why the last bring-up failed
        self._retry_at = 0.0  # no new bring-up before this (monotonic), after a failure
        self._waiting = 0
        self._changed_event = asyncio.Event()

    # -- what tests and metrics read ------------------------------------------------------
    def in_flight(self) -> dict[str, int]:
        return {replica: count for replica, count in self._in_flight.items() if count}

    @property
    def waiting(self) -> int:
        return self._waiting

    def busy(self) -> bool:
        return bool(self.in_flight() or self._waiting or self._growing or self._sleeping)

    # -- leasing --------------------------------------------------------------------------
    async def acquire(self) -> Lease:
        """A lease on the ready replica with the fewest requests in flight, waiting (bounded)
        for one to be woken, started or added when none has a free slot."""
        deadline = self._clock.monotonic() + self._policy.queue_timeout_s
        queued = False
        try:
            while True:
                changed = self._changed_event
                replicas = await self._replicas.list(self.deployment)
                self._note(replicas)
                lease = self._try_lease(replicas)
                if lease is not None:
                    return lease
                if not queued:
                    if self._waiting >= self._policy.max_queue:
                        raise self._unavailable("too many requests are waiting for it")
                    self._waiting += 1
                    queued = True
                self._grow(replicas)
                if not self._growing and not self._sleeping and not self._has_ready(replicas):
                    raise self._failure or self._unavailable("it has no replica that can start")
                await self._wait(changed, deadline)
        finally:
            if queued:
                self._waiting -= 1

    def _note(self, replicas: Sequence[Replica]) -> None:
        """Start the idle clock of replicas seen for the first time; forget a replica's health
        once it stops serving or moves; forget replicas that are gone."""
        now = self._clock.monotonic()
        for replica in replicas:
            self._last_active.setdefault(replica.id, now)
            checked = self._ready.get(replica.id, replica.address)
            if replica.state not in _SERVING_STATES or checked != replica.address:
                self._ready.pop(replica.id, None)
        listed = {replica.id for replica in replicas}
        for gone in [
            r for r in self._last_active if r not in listed and not self._in_flight.get(r)
        ]:
            self._last_active.pop(gone, None)
            self._in_flight.pop(gone, None)
            self._ready.pop(gone, None)

    def _usable(self, replica: Replica) -> bool:
        return (
            replica.state in _SERVING_STATES
            and self._ready.get(replica.id) == replica.address
            and replica.id not in self._sleeping
        )

    def _has_ready(self, replicas: Sequence[Replica]) -> bool:
        return any(self._usable(replica) for replica in replicas)

    def _try_lease(self, replicas: Sequence[Replica]) -> Lease | None:
        limit = max(1, self.deployment.concurrency)
        free = [
            replica
            for replica in replicas
            if self._usable(replica) and self._in_flight.get(replica.id, 0) < limit
        ]
        if not free:
            return None
        # Fewest in flight; among equals the most recently used, so that spare replicas go
        # idle (and are suspended) when the load falls.
        chosen = min(
            free,
            key=lambda r: (self._in_flight.get(r.id, 0), -self._last_active.get(r.id, 0.0), r.id),
        )
        self._in_flight[chosen.id] = self._in_flight.get(chosen.id, 0) + 1
        self._last_active[chosen.id] = self._clock.monotonic()
        return Lease(self, chosen)

    def _release(self, replica: Replica, failed: bool) -> None:
        self._in_flight[replica.id] = max(0, self._in_flight.get(replica.id, 0) - 1)
        self._last_active[replica.id] = self._clock.monotonic()
        if failed:
            self._ready.pop(replica.id, None)
        self._changed()

    # -- bringing replicas up -------------------------------------------------------------
    def _grow(self, replicas: Sequence[Replica]) -> None:
        """Start what the waiting requests need: a health check of a serving replica not yet
        checked; a replica woken when none is ready, or when the queue is past its threshold;
        a new replica when there is none left to wake and ``max_replicas`` allows."""
        for replica in replicas:
            if (
                replica.state in _SERVING_STATES
                and replica.id not in self._ready
                and replica.id not in self._sleeping
            ):
                self._start_growth(replica.id, replica)
        if self._growing:
            return
        if self._has_ready(replicas) and self._waiting <= self._policy.queue_threshold:
            return
        wakeable = sorted(
            (r for r in replicas if r.state in _WAKEABLE_STATES and r.id not in self._sleeping),
            key=lambda r: (r.state != ReplicaState.SUSPENDED, r.id),
        )
        if wakeable:
            self._start_growth(wakeable[0].id, wakeable[0])
        elif len(replicas) < self.deployment.max_replicas:
            self._start_growth(_SCALE_OUT, None)

    def _start_growth(self, key: str, replica: Replica | None) -> None:
        if key in self._growing or self._clock.monotonic() < self._retry_at:
            return
        self._failure = None
        self._growing[key] = asyncio.create_task(self._bring_up(key, replica))

    async def _bring_up(self, key: str, replica: Replica | None) -> None:
        try:
            if replica is None:
                replica = await self._replicas.scale_out(self.deployment)
                log.info("deployment %s: added replica %s", self.deployment.id, replica.id)
            if replica.state in _WAKEABLE_STATES:
                log.info("deployment %s: waking %s replica %s", *self._named(replica))
                replica = await self._replicas.wake(replica)
            if await self._await_healthy(replica):
                self._ready[replica.id] = replica.address
                self._last_active[replica.id] = self._clock.monotonic()
        except (ServiceUnavailable, InsufficientCapacity) as exc:
            self._failure = self._unavailable(exc.message)
        except HangarError as exc:
            self._failure = BadGateway(
                f"a replica of model {self.deployment.name!r} failed to start: {exc.message}",
                deployment=self.deployment.id,
                replica=replica.id if replica else None,
            )
        except Exception as exc:
            log.exception("deployment %s: bringing up a replica failed", self.deployment.id)
            self._failure = BadGateway(
                f"a replica of model {self.deployment.name!r} failed to start: {exc!r}",
                deployment=self.deployment.id,
            )
        finally:
            if self._failure is not None:
                self._retry_at = self._clock.monotonic() + self._policy.retry_after_s
            self._growing.pop(key, None)
            self._changed()

    def _named(self, replica: Replica) -> tuple[str, str, str]:
        return self.deployment.id, replica.state.value, replica.id

    async def _await_healthy(self, replica: Replica) -> bool:
        """Poll the replica's health until it answers (True), or until it is no longer serving
        at that address, as when it was suspended meanwhile (False: nothing failed, the
        waiting requests look again)."""
        deadline = self._clock.monotonic() + self._policy.wake_timeout_s
        while not await self._probe(replica.address):
            if self._clock.monotonic() >= deadline:
                raise BadGateway(
                    f"replica {replica.id} did not answer its health check within "
                    f"{self._policy.wake_timeout_s:g} s",
                    replica=replica.id,
                )
            await self._clock.sleep(self._policy.health_interval_s)
            now = {r.id: r for r in await self._replicas.list(self.deployment)}.get(replica.id)
            if now is None or now.state not in _SERVING_STATES or now.address != replica.address:
                return False
        return True

    # -- idle suspension and minimum ------------------------------------------------------
    async def reconcile(self) -> None:
        """Suspend replicas idle for ``idle_s`` while more than ``min_replicas`` are awake;
        wake replicas while fewer are."""
        replicas = await self._replicas.list(self.deployment)
        self._note(replicas)
        now = self._clock.monotonic()
        awake = [r for r in replicas if r.state in _SERVING_STATES and r.id not in self._sleeping]
        spare = len(awake) - self.deployment.min_replicas
        idle = sorted(
            (r for r in awake if self._idle(r.id)),
            key=lambda r: self._last_active.get(r.id, now),
        )
        for replica in idle[: max(0, spare)]:
            if self._idle(replica.id):  # still, after suspending the ones before it
                await self._put_to_sleep(replica)
        missing = self.deployment.min_replicas - len(awake) - len(self._growing)
        for replica in [r for r in replicas if r.state in _WAKEABLE_STATES][: max(0, missing)]:
            self._start_growth(replica.id, replica)

    def _idle(self, replica_id: str) -> bool:
        now = self._clock.monotonic()
        return (
            not self._in_flight.get(replica_id)
            and replica_id not in self._growing
            and now - self._last_active.get(replica_id, now) >= self._policy.idle_s
        )

    async def _put_to_sleep(self, replica: Replica) -> None:
        self._sleeping.add(replica.id)
        self._ready.pop(replica.id, None)
        try:
            log.info("deployment %s: suspending idle replica %s", self.deployment.id, replica.id)
            await self._replicas.sleep(replica)
        except HangarError as exc:
            log.warning(
                "deployment %s: suspending %s failed: %s", replica.deployment, replica.id, exc
            )
        finally:
            self._sleeping.discard(replica.id)
            self._changed()

    async def close(self) -> None:
        """Cancel what is being brought up (the gateway is shutting down)."""
        tasks = list(self._growing.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- waiting --------------------------------------------------------------------------
    def _changed(self) -> None:
        self._changed_event.set()
        self._changed_event = asyncio.Event()

    async def _wait(self, changed: asyncio.Event, deadline: float) -> None:
        remaining = deadline - self._clock.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            await run_with_deadline(self._clock, remaining, changed.wait())
        except TimeoutError:
            raise self._unavailable("no replica became free in time") from None

    def _unavailable(self, why: str) -> ServiceUnavailable:
        return ServiceUnavailable(
            f"model {self.deployment.name!r} cannot take the request now: {why}",
            app=self.deployment.app,
            reason=why,
            retry_after_s=self._policy.retry_after_s,
            deployment=self.deployment.id,
        )
