"""The Alibaba GPU cluster trace (cluster-trace-gpu-v2023, "openb") and its workload sampling.

Node lists: ``sn,cpu_milli,memory_mib,gpu,model``. Pod lists: ``name,cpu_milli,memory_mib,
num_gpu,gpu_milli[,gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time]``;
``gpu_milli`` below 1000 with one GPU is a share of it, ``gpu_spec`` like ``V100M16|V100M32``
restricts the GPU model, and the times (seconds) say when the pod was created and deleted.

Sampling follows the FGD paper's simulator: pods are drawn (with replacement) from the list and
appended until the requested GPUs would pass ``ratio`` times the cluster's GPU capacity (or
removed at random while above it), then shuffled; one seed gives one workload.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MILLI_PER_GPU = 1000


@dataclass(frozen=True, slots=True)
class TraceNode:
    name: str
    cpu_milli: int
    memory_mib: int
    gpus: int
    model: str


@dataclass(frozen=True, slots=True)
class TracePod:
    name: str
    cpu_milli: int
    memory_mib: int
    num_gpu: int
    gpu_milli: int
    """Per GPU: 1000 for whole GPUs, less for a share of the one GPU."""
    gpu_spec: frozenset[str] | None
    created: int | None = None
    """Creation time (s), when the list has one."""
    deleted: int | None = None
    """Deletion time (s), when the list has one."""

    @property
    def lifetime(self) -> int | None:
        """Seconds from creation to deletion (at least 1), or None without both times."""
        if self.created is None or self.deleted is None:
            return None
        return max(1, self.deleted - self.created)

    @property
    def gpu_total_milli(self) -> int:
        return self.num_gpu * self.gpu_milli

    @property
    def is_share(self) -> bool:
        return self.num_gpu == 1 and self.gpu_milli < MILLI_PER_GPU


def load_nodes(path: Path) -> list[TraceNode]:
    with path.open(newline="") as handle:
        return [
            TraceNode(
                name=row["sn"],
                cpu_milli=int(row["cpu_milli"]),
                memory_mib=int(row["memory_mib"]),
                gpus=int(row["gpu"]),
                model=(row.get("model") or "").strip(),
            )
            for row in csv.DictReader(handle)
        ]


def load_pods(path: Path) -> list[TracePod]:
    pods = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            num_gpu = int(row["num_gpu"])
            gpu_milli = int(row["gpu_milli"]) if num_gpu else 0
            if num_gpu and not 0 < gpu_milli <= MILLI_PER_GPU:
                raise ValueError(f"{path}: pod {row['name']} asks for {gpu_milli} milli-GPU")
            if num_gpu > 1 and gpu_milli != MILLI_PER_GPU:
                raise ValueError(f"{path}: pod {row['name']} shares more than one GPU")
            spec = (row.get("gpu_spec") or "").strip()
            pods.append(
                TracePod(
                    name=row["name"],
                    cpu_milli=int(row["cpu_milli"]),
                    memory_mib=int(row["memory_mib"]),
                    num_gpu=num_gpu,
                    gpu_milli=gpu_milli,
                    gpu_spec=frozenset(spec.split("|")) if spec else None,
                    created=_optional_int(row.get("creation_time")),
                    deleted=_optional_int(row.get("deletion_time")),
                )
            )
    return pods


def _optional_int(text: str | None) -> int | None:
    text = (text or "").strip()
    return int(text) if text else None


def tune_workload(
    pods: Sequence[TracePod], capacity_milli: int, ratio: float, rng: random.Random
) -> list[TracePod]:
    """A shuffled workload whose GPU requests total about ``ratio`` x ``capacity_milli``."""
    if not any(pod.gpu_total_milli for pod in pods):
        raise ValueError("the pod list asks for no GPU")
    target = ratio * capacity_milli
    workload = list(pods)
    total = sum(pod.gpu_total_milli for pod in workload)
    if total < target:
        while True:
            pod = pods[rng.randrange(len(pods))]
            if total + pod.gpu_total_milli > target:
                break
            workload.append(pod)
            total += pod.gpu_total_milli
    while total > target:
        pod = workload.pop(rng.randrange(len(workload)))
        total -= pod.gpu_total_milli
    rng.shuffle(workload)
    return workload
