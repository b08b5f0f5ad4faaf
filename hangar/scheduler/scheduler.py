"""Placement and claim as one step: choose with the index, write with compare-and-set.

Each ``Scheduler`` keeps its own index of the fleet (several may run against one store, as
API replicas do). A lost compare-and-set means another scheduler changed that host: the
scheduler re-reads the host and places again, so the loser either lands elsewhere or gets
``insufficient_capacity``; it never writes over the winner.
"""

from __future__ import annotations

from collections.abc import Callable

from hangar.errors import InsufficientCapacity, InvalidRequest, StoreError
from hangar.scheduler.claims import ClaimStore
from hangar.scheduler.index import PRESSURE_REFRESH, Choice, PlacementIndex, stable_rank
from hangar.scheduler.model import Placement, PlacementRequest
from hangar.scheduler.profile import WorkloadProfile
from hangar.scheduler.regions import RegionCatalog

DEFAULT_MAX_ATTEMPTS = 8


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
    ) -> None:
        self._store = store
        self._catalog = catalog or RegionCatalog()
        self._max_attempts = max_attempts
        self.index = PlacementIndex(profile or WorkloadProfile.empty(), rank_of, pressure_refresh)
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
        for _ in range(self._max_attempts):
            choice = self._choose(request, regions)
            if choice is None:
                raise capacity_error(request, regions)
            claim = choice.claim(request)
            new_state = choice.state.with_claim(claim)
            if self._store.compare_and_set(choice.host_id, choice.version, new_state):
                self.index.upsert(new_state, choice.version + 1)
                return Placement(choice.host_id, new_state.region, claim)
            self.refresh_host(choice.host_id)
        raise StoreError(
            f"placement of {request.machine_id} lost {self._max_attempts} races in a row",
            machine_id=request.machine_id,
            attempts=self._max_attempts,
        )

    def release(self, host_id: str, machine_id: str) -> None:
        """Give back what ``machine_id`` holds on ``host_id`` (its GPUs go to ``cleaning``)."""
        for _ in range(self._max_attempts):
            entry = self.index.get(host_id)
            if entry is None:
                self.refresh_host(host_id)
                entry = self.index.get(host_id)
                if entry is None:
                    return
            new_state = entry.state.without_claim(machine_id)
            if new_state is entry.state:
                return
            if self._store.compare_and_set(host_id, entry.version, new_state):
                self.index.upsert(new_state, entry.version + 1)
                return
            self.refresh_host(host_id)
        raise StoreError(
            f"release of {machine_id} on {host_id} lost {self._max_attempts} races in a row",
            machine_id=machine_id,
            host_id=host_id,
        )

    def _choose(self, request: PlacementRequest, regions: tuple[str, ...]) -> Choice | None:
        for region in regions:
            choice = self.index.choose(request, region)
            if choice is not None:
                return choice
        return None


def capacity_error(request: PlacementRequest, regions: tuple[str, ...]) -> InsufficientCapacity:
    """Fly-shaped: says where it looked and for what."""
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
    return InsufficientCapacity(
        f"insufficient resources available to fulfill request: no host in {where} has room "
        f"for {what} with {request.cpu_milli / 1000:g} CPUs and {request.memory_mb} MB of memory",
        regions=list(regions),
        gpu_kinds=kinds,
        gpus=request.gpus,
        gpu_milli=request.gpu_milli,
        cpu_milli=request.cpu_milli,
        memory_mb=request.memory_mb,
        **({"gpu_slice": request.gpu_slice} if request.gpu_slice else {}),
    )
