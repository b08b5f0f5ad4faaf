"""Placement throughput through etcd: schedulers in separate processes racing on one fleet.

``run_etcd_race_bench`` registers a synthetic fleet under a fresh prefix, starts ``schedulers``
worker processes (each with its own client, watch-fed ``EtcdClaimStore`` and ``Scheduler``, as
API replicas would run), releases them together on the same request stream dealt round-robin,
and times until the last one is done. Each places ``batch`` requests per ``place_many`` (one
etcd transaction per attempt; ``batch`` 1 uses ``place``, one transaction per placement) and
refreshes its index from its cache every ``refresh_every`` requests. Afterwards it reads every
host back from etcd and checks that no machine is claimed twice, no GPU is over-committed and
every claim is one a worker was told it won (``double_claims`` counts every violation).

Where the time goes (measured on a 2-core machine): etcd's JSON gateway costs about the same
per transaction whatever it holds, so one placement per transaction spends about 2.4 ms of etcd
CPU (3 members) and 0.9 ms of scheduler CPU per placement; 64 per transaction, about 0.18 ms
and 0.13 ms. Nested transactions (one per host) cost etcd twice the CPU of one flat one, so
``EtcdClaimStore`` sends flat ones. Refreshing each scheduler's whole view often makes the two
converge on the same half-filled hosts (packing) and multiplies conflicts: every 500 requests
gave 2,832 conflicts in 30,000 requests, every 10,000 gave 259.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import secrets
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as EventType
from typing import Any

from hangar.errors import HangarError, InsufficientCapacity, StoreError
from hangar.scheduler.bench import PROFILE_SAMPLE
from hangar.scheduler.index import stable_rank
from hangar.scheduler.model import Placement, PlacementRequest
from hangar.scheduler.profile import WorkloadProfile
from hangar.scheduler.scheduler import Scheduler
from hangar.scheduler.synthetic import synthetic_hosts, synthetic_requests
from hangar.store.etcd.claims import EtcdClaimStore
from hangar.store.etcd.client import EtcdClient
from hangar.store.etcd.keys import KeyLayout

BENCH_TIMEOUT_S = 30.0
"""Client timeout of the bench's etcd calls (a loaded single-core etcd can be slow)."""
START_TIMEOUT_S = 300.0
RACE_TIMEOUT_S = 3600.0
POLL_S = 0.5


@dataclass(frozen=True, slots=True)
class WorkerResult:
    number: int
    requests: int
    placed: dict[str, str]
    """Machine -> host, for every placement this worker was told it won."""
    rejected: int
    errors: dict[str, int]
    """Error code -> count, for answers other than a placement or insufficient_capacity."""
    lost_races: int
    retried: int
    seconds: float
    cpu_seconds: float


@dataclass(frozen=True, slots=True)
class EtcdRaceResult:
    endpoints: tuple[str, ...]
    hosts: int
    machines: int
    batch: int
    refresh_every: int
    seconds: float
    setup_seconds: float
    workers: tuple[WorkerResult, ...]
    double_claims: int
    unaccounted_claims: int
    server_cpu_seconds: float | None = None
    """CPU the etcd members spent during the race, when they run here (``--etcd-cluster``)."""
    load_average: tuple[float, float] = (0.0, 0.0)
    """The machine's 1-minute load average when the race started and when it ended."""

    @property
    def placed(self) -> int:
        return sum(len(worker.placed) for worker in self.workers)

    @property
    def rejected(self) -> int:
        return sum(worker.rejected for worker in self.workers)

    @property
    def conflicts(self) -> int:
        return sum(worker.lost_races for worker in self.workers)

    @property
    def retries(self) -> int:
        return sum(worker.retried for worker in self.workers)

    @property
    def placements_per_s(self) -> float:
        return self.machines / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        lines = [
            f"etcd {','.join(self.endpoints)}: {self.hosts} hosts, {self.machines} requests, "
            f"{len(self.workers)} schedulers racing (processes), batch {self.batch}, "
            f"refresh every {self.refresh_every}; setup {self.setup_seconds:.1f} s",
        ]
        for worker in self.workers:
            lines.append(
                f"  scheduler {worker.number}: {worker.requests} requests in "
                f"{worker.seconds:.2f} s (cpu {worker.cpu_seconds:.2f} s): "
                f"{len(worker.placed)} placed, {worker.rejected} insufficient_capacity, "
                f"errors {worker.errors or 'none'}, {worker.lost_races} conflicts, "
                f"{worker.retried} retries"
            )
        lines.append(
            f"  {self.placed} placed, {self.rejected} insufficient_capacity in "
            f"{self.seconds:.2f} s; conflicts (lost compare-and-sets) {self.conflicts}, "
            f"retries (placements chosen again) {self.retries}"
        )
        lines.append(
            f"  double claims: {self.double_claims}; claims no scheduler was told it won: "
            f"{self.unaccounted_claims}"
        )
        client_cpu = sum(worker.cpu_seconds for worker in self.workers)
        cpu = f"  cpu per request: schedulers {client_cpu / self.machines * 1e6:.0f} us"
        if self.server_cpu_seconds is not None:
            cpu += f", etcd {self.server_cpu_seconds / self.machines * 1e6:.0f} us"
        lines.append(
            f"{cpu}; load average {self.load_average[0]:.1f} at start, "
            f"{self.load_average[1]:.1f} at end ({os.cpu_count()} cores)"
        )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "endpoints": list(self.endpoints),
            "hosts": self.hosts,
            "machines": self.machines,
            "schedulers": len(self.workers),
            "batch": self.batch,
            "refresh_every": self.refresh_every,
            "seconds": round(self.seconds, 3),
            "setup_seconds": round(self.setup_seconds, 3),
            "placed": self.placed,
            "rejected": self.rejected,
            "conflicts": self.conflicts,
            "retries": self.retries,
            "double_claims": self.double_claims,
            "unaccounted_claims": self.unaccounted_claims,
            "server_cpu_seconds": self.server_cpu_seconds,
            "load_average": list(self.load_average),
            "placements_per_s": round(self.placements_per_s, 1),
            "workers": [
                {
                    "requests": w.requests,
                    "placed": len(w.placed),
                    "rejected": w.rejected,
                    "errors": w.errors,
                    "conflicts": w.lost_races,
                    "retries": w.retried,
                    "seconds": round(w.seconds, 3),
                    "cpu_seconds": round(w.cpu_seconds, 3),
                }
                for w in self.workers
            ],
        }


def run_etcd_race_bench(
    endpoints: Sequence[str],
    hosts: int,
    machines: int,
    *,
    schedulers: int = 2,
    batch: int = 64,
    refresh_every: int = 10_000,
    seed: int = 0,
    spread_ranks: bool = True,
    keep: bool = False,
    server_cpu: Callable[[], float] | None = None,
) -> EtcdRaceResult:
    """``spread_ranks`` gives each scheduler its own order among equally good hosts (replicas
    would be configured so), so racing schedulers start filling different hosts.
    ``server_cpu`` reads the etcd members' CPU seconds so far (when they run here)."""
    started = time.perf_counter()
    layout = KeyLayout(f"/hangar-bench-{secrets.token_hex(4)}")
    client = EtcdClient(endpoints, timeout_s=BENCH_TIMEOUT_S)
    try:
        EtcdClaimStore(client, layout).put_hosts(synthetic_hosts(hosts, seed))
        requests = synthetic_requests(machines, seed)
        context = multiprocessing.get_context("spawn")
        go = context.Event()
        messages = context.Queue()
        workers = [
            context.Process(
                target=_worker,
                args=(
                    number,
                    list(endpoints),
                    layout.prefix,
                    requests[number::schedulers],
                    requests[:PROFILE_SAMPLE],
                    batch,
                    refresh_every,
                    spread_ranks,
                    go,
                    messages,
                ),
                name=f"bench scheduler {number}",
            )
            for number in range(schedulers)
        ]
        for worker in workers:
            worker.start()
        try:
            _collect(messages, workers, "ready", START_TIMEOUT_S)
            setup = time.perf_counter() - started
            load_start = os.getloadavg()[0]
            cpu_start = server_cpu() if server_cpu is not None else 0.0
            go.set()
            outcomes = _collect(messages, workers, "done", RACE_TIMEOUT_S)
            cpu_spent = server_cpu() - cpu_start if server_cpu is not None else None
            load_end = os.getloadavg()[0]
        finally:
            go.set()
            for worker in workers:
                worker.join(timeout=10)
                if worker.is_alive():
                    worker.kill()
                    worker.join()
        done = sorted((o for o in outcomes if isinstance(o, WorkerResult)), key=lambda w: w.number)
        double, unaccounted = _check_claims(EtcdClaimStore(client, layout), done)
        return EtcdRaceResult(
            endpoints=tuple(endpoints),
            hosts=hosts,
            machines=machines,
            batch=batch,
            refresh_every=refresh_every,
            seconds=max(worker.seconds for worker in done),  # they start on one signal
            setup_seconds=setup,
            workers=tuple(done),
            double_claims=double,
            unaccounted_claims=unaccounted,
            server_cpu_seconds=cpu_spent,
            load_average=(load_start, load_end),
        )
    finally:
        if not keep:
            with contextlib.suppress(StoreError):  # etcd gone: its error is already on its way
                client.delete(layout.prefix + "/", prefix=True)
        client.close()


def _check_claims(store: EtcdClaimStore, workers: Sequence[WorkerResult]) -> tuple[int, int]:
    """(double claims, claims nobody was told they won), from what etcd holds now."""
    snapshot = store.snapshot()  # every state decodes, so no GPU is over-committed
    holders: Counter[str] = Counter()
    gpu_holders: Counter[tuple[str, int]] = Counter()
    where: dict[str, str] = {}
    for record in snapshot.values():
        for claim in record.state.claims:
            holders[claim.machine_id] += 1
            where[claim.machine_id] = record.state.id
            if claim.whole_gpus:
                for index in claim.gpu_indexes:
                    gpu_holders[(record.state.id, index)] += 1
    double = sum(count - 1 for count in holders.values() if count > 1)
    double += sum(count - 1 for count in gpu_holders.values() if count > 1)
    told = {machine: host for worker in workers for machine, host in worker.placed.items()}
    double += sum(1 for machine, host in told.items() if where.get(machine) != host)
    unaccounted = sum(1 for machine in where if machine not in told)
    return double, unaccounted


def _collect(
    messages: Any, workers: Sequence[BaseProcess], kind: str, timeout_s: float
) -> list[object]:
    """One ``kind`` message from every worker; a worker's failure (or death) raises."""
    deadline = time.monotonic() + timeout_s
    answers: list[object] = []
    quiet_polls = 0
    while len(answers) < len(workers):
        try:
            got, body = messages.get(timeout=POLL_S)
        except queue.Empty:
            exited = sum(1 for worker in workers if not worker.is_alive())
            quiet_polls = quiet_polls + 1 if exited > len(answers) else 0
            if quiet_polls > 1:  # a worker is gone and said nothing for a whole poll
                raise RuntimeError(f"a bench scheduler exited before it was {kind}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"bench schedulers not {kind} in {timeout_s:.0f} s") from None
            continue
        if got == "failed":
            raise RuntimeError(f"a bench scheduler failed: {body}")
        if got == kind:
            answers.append(body)
    return answers


def _worker(
    number: int,
    endpoints: list[str],
    prefix: str,
    requests: list[PlacementRequest],
    profile_sample: list[PlacementRequest],
    batch: int,
    refresh_every: int,
    spread_ranks: bool,
    go: EventType,
    messages: Any,
) -> None:
    try:
        result = _place_all(
            number,
            endpoints,
            prefix,
            requests,
            profile_sample,
            batch,
            refresh_every,
            spread_ranks,
            lambda: (messages.put(("ready", number)), go.wait(START_TIMEOUT_S)),
        )
        messages.put(("done", result))
    except BaseException as error:
        messages.put(("failed", f"scheduler {number}: {type(error).__name__}: {error}"))


def _place_all(
    number: int,
    endpoints: list[str],
    prefix: str,
    requests: list[PlacementRequest],
    profile_sample: list[PlacementRequest],
    batch: int,
    refresh_every: int,
    spread_ranks: bool,
    ready: Callable[[], object],
) -> WorkerResult:
    client = EtcdClient(endpoints, timeout_s=BENCH_TIMEOUT_S)
    store = EtcdClaimStore(client, KeyLayout(prefix)).start()
    salt = f"scheduler-{number}:"
    scheduler = Scheduler(
        store,
        WorkloadProfile.from_requests(profile_sample),
        rank_of=(lambda host_id: stable_rank(salt + host_id)) if spread_ranks else stable_rank,
    )
    placed: dict[str, str] = {}
    rejected = 0
    errors: Counter[str] = Counter()
    ready()  # says so, then waits for the others: every scheduler starts at once
    started, cpu_started = time.perf_counter(), time.process_time()
    since_refresh = 0
    for first in range(0, len(requests), batch):
        chunk = requests[first : first + batch]
        answers: list[Placement | HangarError]
        if batch == 1:
            try:
                answers = [scheduler.place(chunk[0])]
            except HangarError as error:
                answers = [error]
        else:
            answers = scheduler.place_many(chunk)
        for request, answer in zip(chunk, answers, strict=True):
            if isinstance(answer, Placement):
                placed[request.machine_id] = answer.host_id
            elif isinstance(answer, InsufficientCapacity):
                rejected += 1
            else:
                errors[answer.code] += 1
        since_refresh += len(chunk)
        if refresh_every and since_refresh >= refresh_every:
            scheduler.refresh()
            since_refresh = 0
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    store.close()
    client.close()
    return WorkerResult(
        number=number,
        requests=len(requests),
        placed=placed,
        rejected=rejected,
        errors=dict(errors),
        lost_races=scheduler.stats.lost_races,
        retried=scheduler.stats.retried,
        seconds=seconds,
        cpu_seconds=cpu,
    )
