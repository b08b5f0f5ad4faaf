from __future__ import annotations

import random
from pathlib import Path

import pytest

from hangar.scheduler.trace import TracePod, load_nodes, load_pods, tune_workload

FIXTURES = Path(__file__).parent / "fixtures"


def test_the_slice_loads_with_models_shares_and_specs() -> None:
    nodes = load_nodes(FIXTURES / "openb_nodes_slice.csv")
    pods = load_pods(FIXTURES / "openb_pods_slice.csv")
    assert len(nodes) == 50 and len(pods) == 400
    assert {node.model for node in nodes} >= {"G2", "T4", "P100"}
    assert any(pod.is_share for pod in pods)
    assert any(pod.num_gpu > 1 for pod in pods)
    assert any(pod.gpu_spec and len(pod.gpu_spec) > 1 for pod in pods)
    assert all(pod.gpu_milli == 0 for pod in pods if pod.num_gpu == 0)


def test_a_pod_list_without_spec_columns_loads(tmp_path: Path) -> None:
    path = tmp_path / "pods.csv"
    path.write_text("name,cpu_milli,memory_mib,num_gpu,gpu_milli\np1,1000,512,8,1000\n")
    assert load_pods(path) == [TracePod("p1", 1000, 512, 8, 1000, None)]


def test_shared_multi_gpu_pods_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "pods.csv"
    path.write_text("name,cpu_milli,memory_mib,num_gpu,gpu_milli\np1,1000,512,2,500\n")
    with pytest.raises(ValueError):
        load_pods(path)


def _pod(name: str, gpus: int) -> TracePod:
    return TracePod(name, 1000, 1024, gpus, 1000 if gpus else 0, None)


def test_tuning_up_appends_samples_until_the_ratio() -> None:
    pods = [_pod("a", 1), _pod("b", 2), _pod("c", 0)]
    workload = tune_workload(pods, capacity_milli=10_000, ratio=1.3, rng=random.Random(1))
    total = sum(pod.gpu_total_milli for pod in workload)
    assert 11_000 <= total <= 13_000
    assert {pod.name for pod in workload} == {"a", "b", "c"}
    again = tune_workload(pods, capacity_milli=10_000, ratio=1.3, rng=random.Random(1))
    assert again == workload


def test_tuning_down_drops_random_pods() -> None:
    pods = [_pod(f"p{n}", 1) for n in range(30)]
    workload = tune_workload(pods, capacity_milli=10_000, ratio=1.3, rng=random.Random(2))
    assert sum(pod.gpu_total_milli for pod in workload) == 13_000
    assert workload != pods[:13]


def test_a_list_without_gpu_pods_cannot_be_tuned() -> None:
    with pytest.raises(ValueError):
        tune_workload([_pod("c", 0)], 1000, 1.3, random.Random(0))
