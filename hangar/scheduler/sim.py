"""Replaying a trace workload against a policy the way the FGD paper's simulator does.

Pods arrive one by one and never leave; a pod that fits nowhere stays pending. Among equally
scored nodes the first in a fixed per-seed random node order wins (the paper's simulator names
nodes with a random prefix and takes the first best one). The figure of merit is the GPU
allocation ratio at the moment the arrived GPU demand equals the cluster's capacity: the mean
over the arrivals whose cumulative demand rounds to 100 %, as the paper's analysis does.

Baselines follow the paper's definitions: Random (a random feasible node, a random fitting GPU),
BestFit (least CPU and GPU left, weights 0.5/0.5 over the largest node's capacity), DotProd
(smallest dot product of free and requested CPU and GPU), GpuPacking (shared GPUs first, then
free GPUs on used nodes, then idle nodes), FGD (fragmentation gradient descent, for reference).
``hangar`` runs the real scheduler (index, claims, compare-and-set) on the same cluster.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol

from hangar.errors import InsufficientCapacity
from hangar.scheduler.claims import InMemoryClaimStore
from hangar.scheduler.model import Gpu, HostState, PlacementRequest, Pool
from hangar.scheduler.profile import WorkloadProfile
from hangar.scheduler.scheduler import Scheduler
from hangar.scheduler.trace import MILLI_PER_GPU, TraceNode, TracePod, tune_workload

TUNE_RATIO = 1.3
MAX_SPEC_CPU = 128_000
"""The paper's normalisation constants: the largest node's CPU and GPU (milli)."""
MAX_SPEC_GPU = 8_000
MAX_SCORE = 100
FGD_POPULARITY = 0.95
TRACE_REGION = "trace"

NodeChoice = tuple[int, tuple[int, ...]]
"""A node (its position in the cluster's order) and the GPUs taken on it."""


class TraceCluster:
    """Free resources of a trace's nodes, in the per-seed tie-break order."""

    def __init__(self, nodes: Sequence[TraceNode], seed: int) -> None:
        order = list(range(len(nodes)))
        random.Random(f"node-order-{seed}").shuffle(order)
        self.nodes = [nodes[i] for i in order]
        self.cpu_free = [node.cpu_milli for node in self.nodes]
        self.memory_free = [node.memory_mib for node in self.nodes]
        self.gpu_free = [[MILLI_PER_GPU] * node.gpus for node in self.nodes]
        self.largest_gap = [MILLI_PER_GPU if node.gpus else 0 for node in self.nodes]
        self.whole_free = [node.gpus for node in self.nodes]
        self.version = [0] * len(self.nodes)
        self.capacity_milli = sum(node.gpus for node in self.nodes) * MILLI_PER_GPU

    def feasible(self, pod: TracePod) -> list[int]:
        cpu, memory = pod.cpu_milli, pod.memory_mib
        cpu_free, memory_free = self.cpu_free, self.memory_free
        positions = range(len(self.nodes))
        if not pod.num_gpu:
            return [i for i in positions if cpu_free[i] >= cpu and memory_free[i] >= memory]
        if pod.is_share:
            gaps, need = self.largest_gap, pod.gpu_milli
        else:
            gaps, need = self.whole_free, pod.num_gpu
        found = [
            i
            for i in positions
            if gaps[i] >= need and cpu_free[i] >= cpu and memory_free[i] >= memory
        ]
        if pod.gpu_spec is not None:
            found = [i for i in found if self.nodes[i].model in pod.gpu_spec]
        return found

    def place(self, position: int, pod: TracePod, gpus: Sequence[int]) -> None:
        """Apply a placement, refusing any that over-commits the node."""
        node = self.nodes[position]
        free = self.gpu_free[position]
        if self.cpu_free[position] < pod.cpu_milli or self.memory_free[position] < pod.memory_mib:
            raise ValueError(f"{node.name} lacks CPU or memory for {pod.name}")
        if pod.num_gpu:
            if pod.gpu_spec is not None and node.model not in pod.gpu_spec:
                raise ValueError(f"{node.name} ({node.model}) is not allowed for {pod.name}")
            if len(set(gpus)) != pod.num_gpu or any(free[g] < pod.gpu_milli for g in gpus):
                raise ValueError(f"{node.name}: GPUs {list(gpus)} cannot take {pod.name}")
            if not pod.is_share and any(free[g] != MILLI_PER_GPU for g in gpus):
                raise ValueError(f"{node.name}: {pod.name} needs unused GPUs")
            for g in gpus:
                free[g] -= pod.gpu_milli
            self.largest_gap[position] = max(free)
            self.whole_free[position] = sum(1 for milli in free if milli == MILLI_PER_GPU)
        elif gpus:
            raise ValueError(f"{pod.name} asks for no GPU")
        self.cpu_free[position] -= pod.cpu_milli
        self.memory_free[position] -= pod.memory_mib
        self.version[position] += 1


class TracePolicy(Protocol):
    def choose(self, cluster: TraceCluster, pod: TracePod, feasible: list[int]) -> NodeChoice: ...


PolicyFactory = Callable[[TraceCluster, Sequence[TracePod], random.Random], TracePolicy]


def replay(
    nodes: Sequence[TraceNode], pods: Sequence[TracePod], seed: int, factory: PolicyFactory
) -> float:
    """GPU allocation ratio (%) when the arrived demand reaches the cluster's GPU capacity."""
    cluster = TraceCluster(nodes, seed)
    capacity = cluster.capacity_milli
    workload = tune_workload(pods, capacity, TUNE_RATIO, random.Random(seed))
    policy = factory(cluster, workload, random.Random(seed + 1))
    low, high = 0.995 * capacity, 1.005 * capacity
    arrived = allocated = 0
    window: list[int] = []
    for pod in workload:
        feasible = cluster.feasible(pod)
        if feasible:
            position, gpus = policy.choose(cluster, pod, feasible)
            cluster.place(position, pod, gpus)
            allocated += pod.gpu_total_milli
        arrived += pod.gpu_total_milli
        if low <= arrived < high:
            window.append(allocated)
        elif arrived >= high:
            if not window:
                window.append(allocated)
            break
    return 100.0 * sum(window) / len(window) / capacity


# -- GPU choice helpers (the paper's "best" and "random" GPU selection) ------------------


def best_fit_gpu(free: Sequence[int], milli: int) -> int:
    best = -1
    for index, left in enumerate(free):
        if left >= milli and (best < 0 or left < free[best]):
            best = index
    return best


def first_unused_gpus(free: Sequence[int], count: int) -> tuple[int, ...]:
    return tuple([index for index, left in enumerate(free) if left == MILLI_PER_GPU][:count])


def _gpus_best(cluster: TraceCluster, position: int, pod: TracePod) -> tuple[int, ...]:
    free = cluster.gpu_free[position]
    if not pod.num_gpu:
        return ()
    if pod.is_share:
        return (best_fit_gpu(free, pod.gpu_milli),)
    return first_unused_gpus(free, pod.num_gpu)


def _first_best(scores: Sequence[float], feasible: Sequence[int]) -> int:
    return feasible[scores.index(max(scores))]


# -- baselines -----------------------------------------------------------------------------


class RandomPolicy:
    def __init__(self, cluster: TraceCluster, workload: Sequence[TracePod], rng: random.Random):
        self._rng = rng

    def choose(self, cluster: TraceCluster, pod: TracePod, feasible: list[int]) -> NodeChoice:
        position = feasible[self._rng.randrange(len(feasible))]
        free = cluster.gpu_free[position]
        if pod.is_share:
            fitting = [index for index, left in enumerate(free) if left >= pod.gpu_milli]
            return position, (fitting[self._rng.randrange(len(fitting))],)
        return position, first_unused_gpus(free, pod.num_gpu)


class BestFitPolicy:
    def __init__(self, cluster: TraceCluster, workload: Sequence[TracePod], rng: random.Random):
        pass

    def choose(self, cluster: TraceCluster, pod: TracePod, feasible: list[int]) -> NodeChoice:
        cpu, gpu = pod.cpu_milli, pod.gpu_total_milli
        cpu_free, gpu_free = cluster.cpu_free, cluster.gpu_free
        scores = [
            int(
                (
                    1
                    - 0.5 * (cpu_free[i] - cpu) / MAX_SPEC_CPU
                    - 0.5 * (sum(gpu_free[i]) - gpu) / MAX_SPEC_GPU
                )
                * MAX_SCORE
            )
            for i in feasible
        ]
        position = _first_best(scores, feasible)
        return position, _gpus_best(cluster, position, pod)


class DotProdPolicy:
    def __init__(self, cluster: TraceCluster, workload: Sequence[TracePod], rng: random.Random):
        pass

    def choose(self, cluster: TraceCluster, pod: TracePod, feasible: list[int]) -> NodeChoice:
        cpu = pod.cpu_milli / MAX_SPEC_CPU
        gpu = pod.gpu_total_milli / MAX_SPEC_GPU
        cpu_free, gpu_free = cluster.cpu_free, cluster.gpu_free
        scores = [
            int(
                (1 - (cpu_free[i] / MAX_SPEC_CPU * cpu + sum(gpu_free[i]) / MAX_SPEC_GPU * gpu) / 2)
                * MAX_SCORE
            )
            for i in feasible
        ]
        position = _first_best(scores, feasible)
        return position, _gpus_best(cluster, position, pod)


class GpuPackingPolicy:
    """Shared GPUs first (tightest first), then unused GPUs on used nodes, then idle nodes
    (fewest GPUs first); CPU-only pods score the same everywhere."""

    def __init__(self, cluster: TraceCluster, workload: Sequence[TracePod], rng: random.Random):
        pass

    def choose(self, cluster: TraceCluster, pod: TracePod, feasible: list[int]) -> NodeChoice:
        if not pod.num_gpu:
            return feasible[0], ()
        scores = [_packing_score(cluster.gpu_free[i], pod) for i in feasible]
        position = _first_best(scores, feasible)
        return position, _gpus_best(cluster, position, pod)


def _packing_score(free: Sequence[int], pod: TracePod) -> int:
    unused = sum(1 for left in free if left == MILLI_PER_GPU)
    if unused == len(free):
        return max(MAX_SCORE // 3 - unused, unused)
    wanted = pod.num_gpu
    taken: list[int] = []
    fresh = 0
    for index in sorted(range(len(free)), key=lambda g: free[g]):
        if not wanted:
            break
        if pod.gpu_milli <= free[index]:
            wanted -= 1
            taken.append(index)
            fresh += free[index] == MILLI_PER_GPU
    if fresh:
        return max(MAX_SCORE // 2 - fresh, MAX_SCORE // 3)
    left_percent = sum(free[index] * 100 // MILLI_PER_GPU for index in taken)
    return max(MAX_SCORE - left_percent // 10, MAX_SCORE // 2)


class FgdPolicy:
    """Fragmentation gradient descent (Weng et al., ATC '23), as its simulator scores it."""

    def __init__(self, cluster: TraceCluster, workload: Sequence[TracePod], rng: random.Random):
        counts = Counter((p.cpu_milli, p.gpu_milli, p.num_gpu, p.gpu_spec) for p in workload)
        total = sum(counts.values())
        typical: list[tuple[tuple[int, int, int, frozenset[str] | None], int]] = []
        covered = 0
        for key, count in sorted(counts.items(), key=lambda kv: (-kv[1], -kv[0][0], -kv[0][1])):
            if covered >= FGD_POPULARITY * total:
                break
            typical.append((key, count))
            covered += count
        self._typical = [(key, count / covered) for key, count in typical]
        self._cache: dict[tuple[int, int, int, int, int, frozenset[str] | None], NodeChoice] = {}
        self._scores: dict[tuple[int, int, int, int, int, frozenset[str] | None], int] = {}

    def choose(self, cluster: TraceCluster, pod: TracePod, feasible: list[int]) -> NodeChoice:
        best_score = -1
        best: NodeChoice = (feasible[0], ())
        for position in feasible:
            key = (
                position,
                cluster.version[position],
                pod.cpu_milli,
                pod.num_gpu,
                pod.gpu_milli,
                pod.gpu_spec,
            )
            if key not in self._scores:
                self._scores[key], self._cache[key] = self._evaluate(cluster, position, pod)
            if self._scores[key] > best_score:
                best_score, best = self._scores[key], self._cache[key]
        return best

    def _evaluate(
        self, cluster: TraceCluster, position: int, pod: TracePod
    ) -> tuple[int, NodeChoice]:
        free = cluster.gpu_free[position]
        cpu = cluster.cpu_free[position]
        model = cluster.nodes[position].model
        before = self._fragmentation(cpu, model, free)
        after_cpu = cpu - pod.cpu_milli
        if pod.is_share:
            best_score, best_gpu = -1, -1
            for index, left in enumerate(free):
                if left >= pod.gpu_milli:
                    trial = list(free)
                    trial[index] -= pod.gpu_milli
                    score = _sigmoid_score(before - self._fragmentation(after_cpu, model, trial))
                    if score > best_score:
                        best_score, best_gpu = score, index
            return best_score, (position, (best_gpu,))
        gpus = first_unused_gpus(free, pod.num_gpu)
        trial = [0 if index in gpus else left for index, left in enumerate(free)]
        score = _sigmoid_score(before - self._fragmentation(after_cpu, model, trial))
        return score, (position, gpus)

    def _fragmentation(self, cpu: int, model: str, free: Sequence[int]) -> float:
        total = sum(free)
        amount = 0.0
        for (task_cpu, task_milli, task_gpus, spec), weight in self._typical:
            if not task_milli or cpu < task_cpu or (spec is not None and model not in spec):
                amount += weight * total
                continue
            fitting = 0
            stranded = 0
            for left in free:
                if left >= task_milli:
                    fitting += 1
                else:
                    stranded += left
            amount += weight * (stranded if fitting >= task_gpus else total)
        return amount


def _sigmoid_score(gain: float) -> int:
    return int(MAX_SCORE / (1 + math.exp(-gain / MILLI_PER_GPU)))


# -- hangar ------------------------------------------------------------------------------


class HangarPolicy:
    """The real scheduler on the trace: every pod is a placement claimed in a store."""

    def __init__(self, cluster: TraceCluster, workload: Sequence[TracePod], rng: random.Random):
        self._positions = {node.name: position for position, node in enumerate(cluster.nodes)}
        if len(self._positions) != len(cluster.nodes):
            raise ValueError("node names in the trace are not unique")
        store = InMemoryClaimStore(trace_host(node) for node in cluster.nodes)
        profile = WorkloadProfile.from_requests(trace_request(pod, "") for pod in workload)
        self._scheduler = Scheduler(store, profile, rank_of=self._positions.__getitem__)
        self._placed = 0

    def choose(self, cluster: TraceCluster, pod: TracePod, feasible: list[int]) -> NodeChoice:
        self._placed += 1
        try:
            placement = self._scheduler.place(trace_request(pod, f"pod-{self._placed}"))
        except InsufficientCapacity as error:
            raise RuntimeError(f"hangar refused {pod.name}, which fits: {error}") from error
        return self._positions[placement.host_id], placement.claim.gpu_indexes


def trace_host(node: TraceNode) -> HostState:
    """A trace node as a host; the paper lets CPU-only pods use GPU nodes."""
    return HostState(
        id=node.name,
        region=TRACE_REGION,
        pool=Pool.GPU if node.gpus else Pool.GENERAL,
        cpu_milli=node.cpu_milli,
        memory_mb=node.memory_mib,
        gpus=tuple(Gpu(index, node.model, f"{node.name}/gpu{index}") for index in range(node.gpus)),
        allow_cpu_machines=True,
    )


def trace_request(pod: TracePod, machine_id: str) -> PlacementRequest:
    return PlacementRequest(
        cpu_milli=pod.cpu_milli,
        memory_mb=pod.memory_mib,
        gpus=0 if pod.is_share else pod.num_gpu,
        gpu_milli=pod.gpu_milli if pod.is_share else 0,
        gpu_kinds=pod.gpu_spec if pod.num_gpu else None,
        machine_id=machine_id,
    )


POLICIES: dict[str, PolicyFactory] = {
    "random": RandomPolicy,
    "bestfit": BestFitPolicy,
    "gpupacking": GpuPackingPolicy,
    "dotprod": DotProdPolicy,
    "fgd": FgdPolicy,
    "hangar": HangarPolicy,
}
"""Policies by name; ``fgd`` is the paper's own, for reference (slow: it scores every GPU)."""
