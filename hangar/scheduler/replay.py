"""Replaying the trace with arrivals and departures: a Fly-style platform against hangar.

Both platforms get the same stream of requests on the same nodes, each through the real
``Scheduler`` and an ``InMemoryClaimStore``; they differ only in what they let a request ask:

- **fly-style**: whole GPUs only. A share or MIG-slice ask takes a whole GPU (of the slice's
  kind). GPU hosts run only GPU machines.
- **hangar**: whole GPUs, time shares (a part of one GPU, with a memory cap in proportion) and
  MIG slices on the GPUs the operator set up for MIG, placed by hangar's packing. GPU hosts run
  only GPU machines here too, so CPU-only pods never touch the GPU hosts' CPU on either side.

The stream (``build_stream``). The trace's own times put at most ~66 GPUs of demand on its
6,212 GPUs at once (its pods are a sample of a larger cluster), so the replay keeps what the
lists say about time, each pod's lifetime (deletion - creation) and the spacing of arrivals
(creation times), and raises the load:

- ``passes`` passes over the list's arrival times, back to back; at each arrival a pod (its
  shape and lifetime together) is drawn from the list with replacement (per seed). The few
  arrivals before the list's dense part (its earliest 1 % of creation times) are moved to the
  start of that part.
- The arrival clock is compressed by the factor that makes the offered GPU demand (each
  request's asked milli-GPUs over its lifetime, as if nothing waited) average ``load`` x the
  GPU capacity over the measured window. Lifetimes are not compressed.
- The first ``warmup_passes`` passes fill the cluster and are not measured.

Waiting. A request that fits nowhere joins one FIFO queue (at most ``max_queue`` requests;
an arrival that finds it full is refused). Every departure retries the queue in arrival
order, and each waiting request that now fits is placed (a departure frees room on one host
only, so only requests that fit there are tried). A request that has waited ``max_wait_s``
is refused. Released GPUs are handed over at once (the scrub takes no replay time).

MIG. Nodes of ``mig_model`` become GPUs of ``mig_kind`` on both platforms (the trace does not
name that model; the output says so). On hangar, ``mig_fraction`` of each such node's GPUs
carry ``mig_layout``; a GPU is cut into it only while slices are held. ``slice_percent`` of the
share asks (drawn per arrival, the same on both platforms) ask instead for the smallest slice
of the layout that covers their share, on ``mig_kind``.

Measures, over the window: time-averaged GPU allocation (the milli-GPUs that running requests
asked for, as a percentage of the GPU capacity; a share counts its share even where it holds a
whole GPU), time-averaged GPUs held, and the share of GPU requests arriving in the window
that waited (placed late, or still waiting at the end) or were refused.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hangar.errors import InsufficientCapacity
from hangar.model.gpu import GpuState
from hangar.scheduler.claims import InMemoryClaimStore
from hangar.scheduler.mig import MIG_PROFILES, check_layout, profile_milli
from hangar.scheduler.model import MILLI_PER_GPU, Gpu, HostState, PlacementRequest, Pool
from hangar.scheduler.profile import WorkloadProfile
from hangar.scheduler.scheduler import Scheduler
from hangar.scheduler.trace import TraceNode, TracePod

REPLAY_REGION = "trace"
DENSE_QUANTILE = 0.01
FLY = "fly-style"
HANGAR = "hangar"
PLATFORMS = (FLY, HANGAR)


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    passes: int = 4
    warmup_passes: int = 2
    load: float = 1.0
    """Offered GPU demand over the window, as a multiple of the GPU capacity."""
    max_queue: int = 1000
    max_wait_s: float = 3600.0
    mig_model: str = "G3"
    mig_kind: str = "a100-sxm4-80gb"
    mig_fraction: float = 0.5
    mig_layout: tuple[str, ...] = ("3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb")
    slice_percent: float = 5.0

    def __post_init__(self) -> None:
        if self.passes < 1 or not 0 <= self.warmup_passes < self.passes:
            raise ValueError("need at least one pass after the warm-up passes")
        if not self.load > 0:
            raise ValueError("load must be positive")
        if self.max_queue < 0 or self.max_wait_s < 0:
            raise ValueError("max_queue and max_wait_s must not be negative")
        if not 0 <= self.mig_fraction <= 1 or not 0 <= self.slice_percent <= 100:
            raise ValueError("mig_fraction is 0..1 and slice_percent 0..100")
        if self.mig_kind not in MIG_PROFILES:
            raise ValueError(f"{self.mig_kind} is not a MIG-capable kind")
        check_layout(self.mig_kind, self.mig_layout)

    def describe(self) -> list[str]:
        layout = "+".join(self.mig_layout)
        return [
            f"{FLY}: whole GPUs only; a share or slice ask takes a whole GPU (a slice: of its "
            "kind); "
            "GPU hosts run only GPU machines; hangar's scheduler places the whole-GPU asks",
            f"{HANGAR}: whole GPUs, time shares (a part of one GPU with a memory cap), "
            f"MIG slices; GPU hosts run only GPU machines; hangar's packing",
            f"MIG ({HANGAR} only): trace model {self.mig_model} taken as {self.mig_kind} "
            f"(the trace does not name it); {self.mig_fraction * 100:g} % of each such node's GPUs "
            f"set up for {layout}, cut only while slices are held; "
            f"{self.slice_percent:g} % of share asks ask the smallest covering slice instead",
            f"waiting: one FIFO queue retried on every departure, at most {self.max_queue} "
            f"requests; refused after {self.max_wait_s:g} s of waiting or when the queue is full",
        ]


@dataclass(frozen=True, slots=True)
class Arrival:
    number: int
    time: float
    pod: TracePod
    lifetime: float
    gpu_slice: str = ""
    """The MIG profile this share ask asks for instead (empty: it asks a time share)."""


@dataclass(frozen=True, slots=True)
class Stream:
    arrivals: tuple[Arrival, ...]
    window: tuple[float, float]
    compression: float
    """Trace seconds per replay second of the arrival clock."""
    offered_milli: float
    """Offered GPU demand averaged over the window (milli-GPUs)."""


def timed_pods(pods: Sequence[TracePod]) -> list[TracePod]:
    timed = [pod for pod in pods if pod.lifetime is not None]
    if not timed:
        raise ValueError("the pod list has no creation and deletion times")
    return timed


def build_stream(
    pods: Sequence[TracePod], capacity_milli: int, seed: int, config: ReplayConfig
) -> Stream:
    """The arrivals of one seed; see the module docstring."""
    timed = timed_pods(pods)
    created = sorted(pod.created or 0 for pod in timed)
    start = created[min(len(created) - 1, int(DENSE_QUANTILE * len(created)))]
    slots = [max(time, start) - start for time in created]
    span = slots[-1] + 1.0
    rng = random.Random(f"replay-{seed}")
    raw: list[tuple[float, TracePod, str]] = []
    for number in range(config.passes):
        for slot in slots:
            pod = timed[rng.randrange(len(timed))]
            wants_slice = rng.random() * 100 < config.slice_percent
            gpu_slice = _covering_slice(pod, config) if wants_slice else ""
            raw.append((number * span + slot, pod, gpu_slice))
    window_raw = (config.warmup_passes * span, config.passes * span)
    compression = _compression(raw, window_raw, capacity_milli * config.load)
    arrivals = tuple(
        Arrival(number, time / compression, pod, float(pod.lifetime or 1), gpu_slice)
        for number, (time, pod, gpu_slice) in enumerate(raw)
    )
    window = (window_raw[0] / compression, window_raw[1] / compression)
    demand = [(time, pod.gpu_total_milli, pod.lifetime or 1) for time, pod, _ in raw]
    offered = _offered(demand, window_raw, compression)
    return Stream(arrivals, window, compression, offered)


def _covering_slice(pod: TracePod, config: ReplayConfig) -> str:
    """The smallest profile of the layout covering a share pod's share, if the pod may run on
    the MIG kind; "" otherwise."""
    if not pod.is_share or (pod.gpu_spec is not None and config.mig_model not in pod.gpu_spec):
        return ""
    covering = [name for name in config.mig_layout if profile_milli(name) >= pod.gpu_milli]
    return min(covering, key=profile_milli, default="")


def _offered(
    demand: Sequence[tuple[float, int, int]], window: tuple[float, float], compression: float
) -> float:
    low, high = window[0] / compression, window[1] / compression
    total = 0.0
    for time, milli, lifetime in demand:
        if milli:
            begin = time / compression
            overlap = min(high, begin + lifetime) - max(low, begin)
            if overlap > 0:
                total += milli * overlap
    return total / (high - low)


def _compression(
    raw: Sequence[tuple[float, TracePod, str]], window: tuple[float, float], target: float
) -> float:
    """The factor (bisection in log space) whose offered demand over the window is ``target``."""
    demand = [(time, pod.gpu_total_milli, pod.lifetime or 1) for time, pod, _ in raw]
    low, high = 0.0, math.log(1e7)
    if _offered(demand, window, math.exp(high)) < target:
        raise ValueError("the pod list cannot offer that load at any compression")
    for _ in range(50):
        middle = (low + high) / 2
        if _offered(demand, window, math.exp(middle)) < target:
            low = middle
        else:
            high = middle
    return math.exp(high)


def replay_hosts(
    nodes: Sequence[TraceNode], config: ReplayConfig, platform: str
) -> list[HostState]:
    hosts = []
    for node in nodes:
        kind = config.mig_kind if node.model == config.mig_model else node.model
        cut = round(config.mig_fraction * node.gpus) if platform == HANGAR else 0
        layout_for = config.mig_layout if kind == config.mig_kind else ()
        hosts.append(
            HostState(
                id=node.name,
                region=REPLAY_REGION,
                pool=Pool.GPU if node.gpus else Pool.GENERAL,
                cpu_milli=node.cpu_milli,
                memory_mb=node.memory_mib,
                gpus=tuple(
                    Gpu(
                        index,
                        kind,
                        f"{node.name}/gpu{index}",
                        mig_layout=layout_for if index < cut else (),
                    )
                    for index in range(node.gpus)
                ),
            )
        )
    return hosts


def replay_request(
    arrival: Arrival, config: ReplayConfig, platform: str, machine_id: str
) -> PlacementRequest:
    pod = arrival.pod
    kinds = None
    if pod.gpu_spec is not None:
        kinds = frozenset(config.mig_kind if m == config.mig_model else m for m in pod.gpu_spec)
    if arrival.gpu_slice:
        kinds = frozenset([config.mig_kind])
    gpus, milli, gpu_slice = pod.num_gpu, 0, ""
    if pod.is_share:
        if platform == HANGAR:
            gpus, milli, gpu_slice = 0, 0 if arrival.gpu_slice else pod.gpu_milli, arrival.gpu_slice
        else:
            gpus = 1
    return PlacementRequest(
        cpu_milli=pod.cpu_milli,
        memory_mb=pod.memory_mib,
        gpus=gpus,
        gpu_milli=milli,
        gpu_kinds=kinds if pod.num_gpu else None,
        region=REPLAY_REGION,
        machine_id=machine_id,
        gpu_slice=gpu_slice,
    )


@dataclass(slots=True)
class PlatformOutcome:
    platform: str
    allocation: float
    """Time-averaged GPU allocation over the window, % of the GPU capacity."""
    held: float
    """Time-averaged GPUs held (whole GPUs a share holds count whole), % of the capacity."""
    gpu_requests: int
    waited: int
    """GPU requests of the window placed after waiting, or still waiting at its end."""
    refused: int
    cpu_requests: int
    cpu_refused: int
    slices: int
    """Slice asks of the window placed (on a MIG instance for hangar)."""

    @property
    def waited_or_refused(self) -> float:
        return 100.0 * (self.waited + self.refused) / self.gpu_requests if self.gpu_requests else 0

    @property
    def refused_percent(self) -> float:
        return 100.0 * self.refused / self.gpu_requests if self.gpu_requests else 0.0

    @property
    def waited_percent(self) -> float:
        return 100.0 * self.waited / self.gpu_requests if self.gpu_requests else 0.0


@dataclass(slots=True)
class _Waiting:
    arrival: Arrival
    request: PlacementRequest


@dataclass(slots=True)
class _Tally:
    window: tuple[float, float]
    capacity: int
    now: float = 0.0
    allocated: int = 0
    held: int = 0
    allocated_area: float = 0.0
    held_area: float = 0.0
    gpu_requests: int = 0
    waited: int = 0
    refused: int = 0
    cpu_requests: int = 0
    cpu_refused: int = 0
    slices: int = 0

    def advance(self, time: float) -> None:
        low, high = self.window
        begin, end = max(self.now, low), min(time, high)
        if end > begin:
            self.allocated_area += self.allocated * (end - begin)
            self.held_area += self.held * (end - begin)
        self.now = max(self.now, time)

    def counts(self, arrival: Arrival) -> bool:
        return self.window[0] <= arrival.time <= self.window[1]


@dataclass(slots=True)
class _Running:
    host_id: str
    asked: int
    held: int


def replay_platform(
    nodes: Sequence[TraceNode], stream: Stream, platform: str, config: ReplayConfig
) -> PlatformOutcome:
    """Run the stream on one platform; see the module docstring."""
    store = InMemoryClaimStore(replay_hosts(nodes, config, platform))
    requests = [
        replay_request(arrival, config, platform, f"a{arrival.number}")
        for arrival in stream.arrivals
    ]
    scheduler = Scheduler(store, WorkloadProfile.from_requests(requests))
    capacity = sum(node.gpus for node in nodes) * MILLI_PER_GPU
    tally = _Tally(stream.window, capacity)
    waiting: OrderedDict[int, _Waiting] = OrderedDict()
    running: dict[str, _Running] = {}
    departures: list[tuple[float, int, str]] = []

    def start(arrival: Arrival, request: PlacementRequest, waited: bool) -> bool:
        try:
            placement = scheduler.place(request)
        except InsufficientCapacity:
            return False
        claim = placement.claim
        asked = arrival.pod.gpu_total_milli
        held = claim.gpu_milli * len(claim.gpu_indexes)
        running[request.machine_id] = _Running(placement.host_id, asked, held)
        tally.allocated += asked
        tally.held += held
        heapq.heappush(
            departures, (tally.now + arrival.lifetime, arrival.number, request.machine_id)
        )
        if tally.counts(arrival):
            if waited and arrival.pod.num_gpu:
                tally.waited += 1
            if arrival.gpu_slice:
                tally.slices += 1
        return True

    def refuse(arrival: Arrival) -> None:
        if tally.counts(arrival):
            if arrival.pod.num_gpu:
                tally.refused += 1
            else:
                tally.cpu_refused += 1

    def expire(now: float) -> None:
        while waiting:
            number, entry = next(iter(waiting.items()))
            if entry.arrival.time + config.max_wait_s >= now:
                return
            del waiting[number]
            refuse(entry.arrival)

    def depart(machine_id: str) -> None:
        job = running.pop(machine_id)
        tally.allocated -= job.asked
        tally.held -= job.held
        scheduler.release(job.host_id, machine_id)
        _finish_handoff(store, scheduler, job.host_id)
        too_big: set[tuple[object, ...]] = set()
        for number, entry in list(waiting.items()):
            request = entry.request
            shape = (
                request.cpu_milli,
                request.memory_mb,
                request.gpus,
                request.gpu_milli,
                request.gpu_kinds,
                request.gpu_slice,
            )
            if shape in too_big:
                continue  # the host only shrinks while the queue is retried
            if scheduler.index.choose_on(request, job.host_id) is None:
                too_big.add(shape)
                continue
            if not start(entry.arrival, request, waited=True):
                raise RuntimeError(f"{request.machine_id} fits {job.host_id} but failed")
            del waiting[number]

    def depart_until(now: float) -> None:
        while departures and departures[0][0] <= now:
            time, _, machine_id = heapq.heappop(departures)
            tally.advance(time)
            expire(time)
            depart(machine_id)

    end = stream.window[1]
    for arrival, request in zip(stream.arrivals, requests, strict=True):
        depart_until(arrival.time)
        tally.advance(arrival.time)
        expire(arrival.time)
        if tally.counts(arrival):
            if arrival.pod.num_gpu:
                tally.gpu_requests += 1
            else:
                tally.cpu_requests += 1
        if start(arrival, request, waited=False):
            continue
        if len(waiting) >= config.max_queue:
            refuse(arrival)
        else:
            waiting[arrival.number] = _Waiting(arrival, request)
    depart_until(end)
    tally.advance(end)
    expire(end)
    tally.waited += sum(
        1 for entry in waiting.values() if entry.arrival.pod.num_gpu and tally.counts(entry.arrival)
    )
    length = (stream.window[1] - stream.window[0]) * capacity
    return PlatformOutcome(
        platform=platform,
        allocation=100.0 * tally.allocated_area / length if length else 0.0,
        held=100.0 * tally.held_area / length if length else 0.0,
        gpu_requests=tally.gpu_requests,
        waited=tally.waited,
        refused=tally.refused,
        cpu_requests=tally.cpu_requests,
        cpu_refused=tally.cpu_refused,
        slices=tally.slices,
    )


def _finish_handoff(store: InMemoryClaimStore, scheduler: Scheduler, host_id: str) -> None:
    """The agent's handoff, instant in the replay: GPUs left ``cleaning`` become free."""
    record = store.read_host(host_id)
    if record is None:
        return
    state = record.state
    for gpu in state.gpus:
        if gpu.state is GpuState.CLEANING:
            state = state.with_gpu_state(gpu.index, GpuState.FREE)
    if state is not record.state:
        if not store.compare_and_set(host_id, record.version, state):
            raise RuntimeError(f"host {host_id} changed under the replay")
        scheduler.refresh_host(host_id)


@dataclass(frozen=True, slots=True)
class SeedOutcome:
    seed: int
    compression: float
    offered: float
    """Offered GPU demand over the window, % of the capacity."""
    outcomes: tuple[PlatformOutcome, ...]

    def outcome(self, platform: str) -> PlatformOutcome:
        return next(o for o in self.outcomes if o.platform == platform)

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "compression": round(self.compression, 3),
            "offered_percent": round(self.offered, 3),
            "platforms": {
                o.platform: {
                    "allocation_percent": round(o.allocation, 3),
                    "held_percent": round(o.held, 3),
                    "gpu_requests": o.gpu_requests,
                    "waited": o.waited,
                    "refused": o.refused,
                    "waited_or_refused_percent": round(o.waited_or_refused, 3),
                    "cpu_requests": o.cpu_requests,
                    "cpu_refused": o.cpu_refused,
                    "slices": o.slices,
                }
                for o in self.outcomes
            },
        }


def replay_seed(
    nodes: Sequence[TraceNode], pods: Sequence[TracePod], seed: int, config: ReplayConfig
) -> SeedOutcome:
    """Both platforms on one seed's stream."""
    capacity = sum(node.gpus for node in nodes) * MILLI_PER_GPU
    if not capacity:
        raise ValueError("the node list has no GPUs")
    stream = build_stream(pods, capacity, seed, config)
    outcomes = tuple(replay_platform(nodes, stream, name, config) for name in PLATFORMS)
    return SeedOutcome(seed, stream.compression, 100 * stream.offered_milli / capacity, outcomes)
