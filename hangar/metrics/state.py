"""Gauges read from the stores when Prometheus scrapes: machines by state, GPUs by host, kind
and state, usage intervals open, and the image cache's size. Nothing is kept between
scrapes, so the numbers are the stores' own."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from hangar.images.rootfs import cache_usage
from hangar.model.gpu import GpuState
from hangar.model.machine import MachineState
from hangar.scheduler import ClaimStore
from hangar.store.protocol import MachineStore

MACHINES = "hangar_machines"
GPUS = "hangar_gpus"
HOSTS = "hangar_hosts"
CACHE_BYTES = "hangar_image_cache_bytes"
CACHE_ENTRIES = "hangar_image_cache_entries"


def _families() -> dict[str, GaugeMetricFamily]:
    return {
        MACHINES: GaugeMetricFamily(
            MACHINES, "Machines that are not destroyed, by state.", labels=["state"]
        ),
        GPUS: GaugeMetricFamily(
            GPUS,
            "GPUs by host, kind and state (free, claimed, cleaning, quarantined).",
            labels=["host", "kind", "state"],
        ),
        HOSTS: GaugeMetricFamily(HOSTS, "Hosts by region and pool.", labels=["region", "pool"]),
        CACHE_BYTES: GaugeMetricFamily(
            CACHE_BYTES, "Disk space of the image rootfs cache (allocated blocks)."
        ),
        CACHE_ENTRIES: GaugeMetricFamily(CACHE_ENTRIES, "Images in the rootfs cache."),
    }


class StateCollector:
    def __init__(self, machines: MachineStore, claims: ClaimStore, cache_dir: Path) -> None:
        self._machines = machines
        self._claims = claims
        self._cache_dir = cache_dir

    def describe(self) -> Iterable[Metric]:
        return list(_families().values())

    def collect(self) -> Iterable[Metric]:
        families = _families()
        states = Counter(machine.state for machine in self._machines.list_machines(None))
        for state in MachineState:
            if state is not MachineState.DESTROYED:
                families[MACHINES].add_metric([str(state)], states.get(state, 0))
        hosts: Counter[tuple[str, str]] = Counter()
        for record in self._claims.snapshot().values():
            host = record.state
            hosts[(host.region, str(host.pool))] += 1
            gpus = Counter((gpu.kind, gpu.state) for gpu in host.gpus)
            for kind in sorted({gpu.kind for gpu in host.gpus}):
                for gpu_state in GpuState:
                    families[GPUS].add_metric(
                        [host.id, kind, str(gpu_state)], gpus.get((kind, gpu_state), 0)
                    )
        for (region, pool), count in sorted(hosts.items()):
            families[HOSTS].add_metric([region, pool], count)
        cache = cache_usage(self._cache_dir)
        families[CACHE_BYTES].add_metric([], cache.bytes)
        families[CACHE_ENTRIES].add_metric([], cache.entries)
        return list(families.values())
