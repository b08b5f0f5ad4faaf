"""Placement and claim as one step: choose with the index, write with compare-and-set.

Each ``Scheduler`` keeps its own index of the fleet (several may run against one store, as
API replicas do). A lost compare-and-set means another scheduler changed that host: the
scheduler re-reads the host and places again, so the loser either lands elsewhere or gets
``insufficient_capacity``; it never writes over the winner.

``place_many`` places a batch the same way with one store round trip per attempt: on a store
whose writes cost a network round trip and a disk sync (etcd), a batch shares them; a retry
round avoids the hosts that just changed under it (two schedulers packing the same host would
otherwise collide on it round after round). From the third try on, a placement waits a random
moment first (up to 2, 4, 8... ms, at most 50 ms), so schedulers racing in step fall out of
step; from the fourth, a loss re-reads the whole fleet, not just the host.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from hangar.errors import HangarError, InsufficientCapacity, InvalidRequest, StoreError
from hangar.scheduler.claims import ClaimStore, compare_and_set_many
from hangar.scheduler.index import PRESSURE_REFRESH, Choice, PlacementIndex, stable_rank
from hangar.scheduler.model import Claim, HostState, Placement, PlacementRequest
from hangar.scheduler.profile import WorkloadProfile
from hangar.scheduler.regions import RegionCatalog

DEFAULT_MAX_ATTEMPTS = 8
REFRESH_AFTER_LOSSES = 4
"""Tries lost in a row after which a placement re-reads the whole fleet, not just the host.
Sooner costs throughput: measured with two schedulers racing through etcd, re-reading after
two losses made them converge on the same hosts (2.4x the conflicts, a third fewer placements
a second); never re-reading left a stale view, and a hundred placements in 100,000 gave up."""
BACKOFF_S = 0.002
MAX_BACKOFF_S = 0.05


@dataclass(slots=True)
class SchedulerStats:
    lost_races: int = 0
    """Compare-and-sets lost to another writer."""
    retried: int = 0
    """Placements chosen again after their host's write lost."""
    refreshes: int = 0
    """Whole-fleet re-reads after repeated lost races."""


PlacementOutcome = Literal["placed", "insufficient_capacity", "lost_races"]


class PlacementObserver(Protocol):
    """Told how each placement went (metrics); the scheduler knows nothing more of it."""

    def placement_conflict(self, host_id: str) -> None:
        """A compare-and-set on ``host_id`` lost to another writer; placement tries again."""
        ...

    def placement_finished(self, outcome: PlacementOutcome) -> None: ...


class NoPlacementObserver:
    def placement_conflict(self, host_id: str) -> None:
        """Nobody listens."""

    def placement_finished(self, outcome: PlacementOutcome) -> None:
        """Nobody listens."""


class Scheduler:
    """Not thread-safe; run one per thread or process, all against the same store."""

    def __init__(
        self,
        store: ClaimStore,
        profile: WorkloadProfile | None = None,
        catalog: RegionCatalog | None = None,
        rank_of: Callable[[str], int] = stable_rank,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        pressure_refresh: int = PRESSURE_REFRESH,
        sleep: Callable[[float], None] = time.sleep,
        observer: PlacementObserver | None = None,
    ) -> None:
        self._store = store
        self._sleep = sleep
        self._jitter = random.Random()
        self._observer = observer or NoPlacementObserver()
        self._catalog = catalog or RegionCatalog()
        self._max_attempts = max_attempts
        self.index = PlacementIndex(profile or WorkloadProfile.empty(), rank_of, pressure_refresh)
        self.stats = SchedulerStats()
        self.refresh()

    def refresh(self) -> None:
        """Rebuild the index from a fresh snapshot of the store."""
        snapshot = self._store.snapshot()
        for entry in list(self.index.entries()):
            if entry.state.id not in snapshot:
                self.index.remove(entry.state.id)
        for record in snapshot.values():
            current = self.index.get(record.state.id)
            if current is None or current.version != record.version:
                self.index.upsert(record.state, record.version)

    def refresh_host(self, host_id: str) -> None:
        record = self._store.read_host(host_id)
        if record is None:
            self.index.remove(host_id)
        else:
            self.index.upsert(record.state, record.version)

    def place(self, request: PlacementRequest) -> Placement:
        """Choose a host and claim the request's resources on it, atomically."""
        if not request.machine_id:
            raise InvalidRequest("a placement needs the machine's id", field="machine_id")
        regions = self._catalog.expand(request.region, self.index.regions())
        if request.host_id and self.index.get(request.host_id) is None:
            self.refresh_host(request.host_id)
        for attempt in range(self._max_attempts):
            self._back_off(attempt)
            choice = self._choose(request, regions)
            if choice is None:
                self._observer.placement_finished("insufficient_capacity")
                raise capacity_error(request, regions, self._bound_host(request))
            claim = choice.claim(request)
            new_state = choice.state.with_claim(claim)
            if self._store.compare_and_set(choice.host_id, choice.version, new_state):
                self.index.upsert(new_state, choice.version + 1)
                self._observer.placement_finished("placed")
                return Placement(choice.host_id, new_state.region, claim)
            self.stats.lost_races += 1
            self.stats.retried += 1
            self._observer.placement_conflict(choice.host_id)
            self._catch_up([choice.host_id], attempt)
        self._observer.placement_finished("lost_races")
        raise StoreError(
            f"placement of {request.machine_id} lost {self._max_attempts} races in a row",
            machine_id=request.machine_id,
            attempts=self._max_attempts,
        )

    def choose(self, request: PlacementRequest) -> tuple[str, str]:
        """The host (and its region) ``place`` would pick now, claiming nothing (a machine
        created without launching gets a host; its agent claims when it starts it)."""
        regions = self._catalog.expand(request.region, self.index.regions())
        choice = self._choose(request, regions)
        if choice is None:
            raise capacity_error(request, regions, self._bound_host(request))
        return choice.host_id, choice.state.region

    def place_many(self, requests: Sequence[PlacementRequest]) -> list[Placement | HangarError]:
        """Place a batch: each request is chosen as ``place`` would choose it, in order, on the
        index as the earlier ones of the batch left it; every host's new claims go in one
        compare-and-set and all hosts' in one ``compare_and_set_many``. Requests on a host
        that lost its race are chosen again on fresh data, the next round without that host
        (the last round sees every host), as are refusals of that round (they may have seen
        claims that lost, or missed a host sitting out). One answer per request, in order: its
        ``Placement`` or the error ``place`` would raise. A store error (``StoreUnavailable``)
        propagates with the index as it was before the failed attempt."""
        answers: list[Placement | HangarError | None] = [None] * len(requests)
        pending = []
        for position, request in enumerate(requests):
            if request.machine_id:
                pending.append(position)
            else:
                answers[position] = InvalidRequest(
                    "a placement needs the machine's id", field="machine_id"
                )
        benched: list[str] = []
        for attempt in range(self._max_attempts):
            if not pending:
                break
            self._back_off(attempt)
            if attempt == self._max_attempts - 1:
                benched = []  # the last try sees every host: no refusal for want of one
            pending, benched = self._place_attempt(requests, pending, answers, attempt, benched)
        for position in pending:
            if answers[position] is not None:
                continue  # refused on the last attempt: no capacity is its answer
            request = requests[position]
            answers[position] = StoreError(
                f"placement of {request.machine_id} lost {self._max_attempts} races in a row",
                machine_id=request.machine_id,
                attempts=self._max_attempts,
            )
        settled = [answer for answer in answers if answer is not None]
        assert len(settled) == len(requests)
        return settled

    def _place_attempt(
        self,
        requests: Sequence[PlacementRequest],
        pending: list[int],
        answers: list[Placement | HangarError | None],
        attempt: int,
        benched: Sequence[str],
    ) -> tuple[list[int], list[str]]:
        """One round of ``place_many``: choose (not on the ``benched`` hosts, which just changed
        under a write of this batch), write, settle. The positions to try again, and the hosts
        whose writes lost."""
        writes: dict[str, tuple[int, HostState]] = {}
        before: dict[str, tuple[HostState, int]] = {}
        placed: dict[str, list[tuple[int, Claim]]] = {}
        refused: list[int] = []
        set_aside = [entry for host_id in benched if (entry := self.index.get(host_id))]
        for entry in set_aside:
            self.index.remove(entry.state.id)
        try:
            self._choose_batch(requests, pending, answers, writes, before, placed, refused)
        finally:
            for entry in set_aside:
                self.index.upsert(entry.state, entry.version)

        batch = [(host_id, version, state) for host_id, (version, state) in writes.items()]
        try:
            outcomes = compare_and_set_many(self._store, batch)
        except BaseException:
            for state, version in before.values():
                self.index.upsert(state, version)
            raise
        again: list[int] = []
        lost: list[str] = []
        for (host_id, version, state), won in zip(batch, outcomes, strict=True):
            if won:
                entry = self.index.get(host_id)
                if entry is not None and entry.state is state:
                    entry.version = version + 1  # the index holds this state already
                else:
                    self.index.upsert(state, version + 1)
                for position, claim in placed[host_id]:
                    answers[position] = Placement(host_id, state.region, claim)
                continue
            self.stats.lost_races += 1
            self.stats.retried += len(placed[host_id])
            lost.append(host_id)
            for position, _ in placed[host_id]:
                answers[position] = None
                again.append(position)
        if lost:
            self._catch_up(lost, attempt)
        if again or set_aside:  # refusals may have seen claims that lost, or missed a host
            again.extend(refused)
        return sorted(again), lost

    def _choose_batch(
        self,
        requests: Sequence[PlacementRequest],
        pending: list[int],
        answers: list[Placement | HangarError | None],
        writes: dict[str, tuple[int, HostState]],
        before: dict[str, tuple[HostState, int]],
        placed: dict[str, list[tuple[int, Claim]]],
        refused: list[int],
    ) -> None:
        for position in pending:
            request = requests[position]
            regions = self._catalog.expand(request.region, self.index.regions())
            choice = self._choose(request, regions)
            if choice is None:
                answers[position] = capacity_error(request, regions, self._bound_host(request))
                refused.append(position)
                continue
            claim = choice.claim(request)
            try:
                new_state = choice.state.with_claim(claim)
            except InvalidRequest as error:
                answers[position] = error
                continue
            before.setdefault(choice.host_id, (choice.state, choice.version))
            writes[choice.host_id] = (choice.version, new_state)
            placed.setdefault(choice.host_id, []).append((position, claim))
            self.index.upsert(new_state, choice.version)  # later requests see this claim

    def release(self, host_id: str, machine_id: str) -> None:
        """Give back what ``machine_id`` holds on ``host_id`` (its GPUs go to ``cleaning``).

        A claim this scheduler's view lacks may have been made by another (a fleet's API
        replica claims at create, the host's agent releases): the host is read again before
        concluding there is nothing to give back."""
        fresh = False
        for _ in range(self._max_attempts):
            entry = self.index.get(host_id)
            if entry is None:
                self.refresh_host(host_id)
                entry = self.index.get(host_id)
                if entry is None:
                    return
            new_state = entry.state.without_claim(machine_id)
            if new_state is entry.state:
                if fresh:
                    return
                self.refresh_host(host_id)
                fresh = True
                continue
            if self._store.compare_and_set(host_id, entry.version, new_state):
                self.index.upsert(new_state, entry.version + 1)
                return
            self.stats.lost_races += 1
            self.refresh_host(host_id)
        raise StoreError(
            f"release of {machine_id} on {host_id} lost {self._max_attempts} races in a row",
            machine_id=machine_id,
            host_id=host_id,
        )

    def _catch_up(self, host_ids: Sequence[str], attempt: int) -> None:
        """After lost races: re-read those hosts; from the ``REFRESH_AFTER_LOSSES``-th try on,
        the whole fleet instead (the view is stale beyond those hosts: another scheduler has
        been filling hosts this one still sees free; a watch-fed store reads memory)."""
        if attempt + 1 >= REFRESH_AFTER_LOSSES:
            self.refresh()
            self.stats.refreshes += 1
            return
        for host_id in host_ids:
            self.refresh_host(host_id)

    def _back_off(self, attempt: int) -> None:
        """Before the third and later tries: a random pause, growing, so two schedulers that
        keep writing the same host in step fall out of step instead of losing every time."""
        if attempt >= 2:
            ceiling = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (attempt - 2))
            self._sleep(self._jitter.uniform(0, ceiling))

    def _bound_host(self, request: PlacementRequest) -> HostState | None:
        """The one host a host-bound request may go to, as the index sees it."""
        if not request.host_id:
            return None
        entry = self.index.get(request.host_id)
        return entry.state if entry is not None else None

    def _choose(self, request: PlacementRequest, regions: tuple[str, ...]) -> Choice | None:
        if request.host_id:
            return self.index.choose_on(request, request.host_id)
        for region in regions:
            choice = self.index.choose(request, region)
            if choice is not None:
                return choice
        return None


def capacity_error(
    request: PlacementRequest, regions: tuple[str, ...], host: HostState | None = None
) -> InsufficientCapacity:
    """Fly-shaped: says where it looked and for what; for a request bound to one ``host``,
    also what is free there (``free_on``)."""
    kinds = sorted(request.gpu_kinds) if request.gpu_kinds is not None else None
    kind_text = "/".join(kinds) if kinds else "any-kind"
    if request.gpu_slice:
        what = f"a {request.gpu_slice} MIG slice of a {kind_text} GPU"
    elif request.gpus:
        what = f"{request.gpus}x {kind_text} GPU"
    elif request.gpu_milli:
        what = f"a {request.gpu_milli / 1000:g} share of a {kind_text} GPU"
    else:
        what = "a CPU-only machine"
    where = ", ".join(regions) if regions else "no region"
    extra: dict[str, Any] = {"gpu_slice": request.gpu_slice} if request.gpu_slice else {}
    free = ""
    if host is not None:
        text, fields = free_on(host)
        free = f"; {text}"
        extra.update(fields)
    return InsufficientCapacity(
        f"insufficient resources available to fulfill request: no host in {where} has room "
        f"for {what} with {request.cpu_milli / 1000:g} CPUs and {request.memory_mb} MB of memory"
        f"{free}",
        regions=list(regions),
        gpu_kinds=kinds,
        gpus=request.gpus,
        gpu_milli=request.gpu_milli,
        cpu_milli=request.cpu_milli,
        memory_mb=request.memory_mb,
        **extra,
    )


def free_on(host: HostState) -> tuple[str, dict[str, Any]]:
    """What ``host`` has free now, as a sentence and as structured fields: CPUs, memory,
    whole GPUs, free MIG instances by profile, and the GPUs fixed in MIG mode (they serve
    only slices of their layout, never a whole-GPU or shared machine)."""
    instances: dict[str, int] = {}
    for gpu in host.gpus:
        for instance in host.free_instances(gpu.index):
            profile = gpu.mig_layout[instance]
            instances[profile] = instances.get(profile, 0) + 1
    whole = len(host.whole_free_indexes())
    in_mig = [gpu.bdf for gpu in host.gpus if gpu.mig_fixed]
    text = (
        f"host {host.id} has free {host.free_cpu_milli / 1000:g} CPUs, "
        f"{host.free_memory_mb} MB of memory, {whole} whole GPU(s)"
    )
    if instances:
        listed = ", ".join(f"{count}x {name}" for name, count in sorted(instances.items()))
        text += f", MIG instances {listed}"
    if in_mig:
        text += f" (in MIG mode, slices only: {', '.join(in_mig)})"
    fields: dict[str, Any] = {
        "host_id": host.id,
        "free_cpu_milli": host.free_cpu_milli,
        "free_memory_mb": host.free_memory_mb,
        "free_gpus": whole,
        "free_mig_instances": dict(sorted(instances.items())),
        "mig_mode_gpus": in_mig,
    }
    return text, fields
