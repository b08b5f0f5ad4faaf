from __future__ import annotations

import random
import statistics
from pathlib import Path

import pytest

from hangar.scheduler.sim import POLICIES, TraceCluster, replay
from hangar.scheduler.trace import TraceNode, TracePod, load_nodes, load_pods

FIXTURES = Path(__file__).parent / "fixtures"
NODES = load_nodes(FIXTURES / "openb_nodes_slice.csv")
PODS = load_pods(FIXTURES / "openb_pods_slice.csv")


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_replays_deterministically(name: str) -> None:
    first = replay(NODES, PODS, 7, POLICIES[name])
    assert 0 < first <= 100
    assert replay(NODES, PODS, 7, POLICIES[name]) == first


def test_hangar_allocates_more_than_the_paper_baselines_on_a_constrained_slice() -> None:
    seeds = range(1, 6)

    def mean(name: str) -> float:
        return statistics.fmean(replay(NODES, PODS, seed, POLICIES[name]) for seed in seeds)

    hangar = mean("hangar")
    assert hangar > max(mean(name) for name in ("random", "bestfit", "gpupacking", "dotprod"))


def test_the_cluster_refuses_a_placement_that_over_commits() -> None:
    cluster = TraceCluster([TraceNode("n", 8000, 4096, 2, "T4")], seed=0)
    share = TracePod("s", 1000, 1024, 1, 600, None)
    cluster.place(0, share, (0,))
    with pytest.raises(ValueError):
        cluster.place(0, share, (0,))
    with pytest.raises(ValueError):
        cluster.place(0, TracePod("w", 1000, 1024, 1, 1000, None), (0,))
    with pytest.raises(ValueError):
        cluster.place(0, TracePod("g", 1000, 1024, 1, 1000, frozenset({"V100M16"})), (1,))
    with pytest.raises(ValueError):
        cluster.place(0, TracePod("c", 9000, 1024, 0, 0, None), ())
    assert cluster.feasible(TracePod("w", 1000, 1024, 1, 1000, None)) == [0]
    assert cluster.feasible(TracePod("w2", 1000, 1024, 2, 1000, None)) == []


def test_node_order_is_a_per_seed_permutation() -> None:
    orders = {tuple(node.name for node in TraceCluster(NODES, seed).nodes) for seed in (1, 2)}
    assert len(orders) == 2
    assert all(sorted(order) == sorted(node.name for node in NODES) for order in orders)


def test_random_gpu_choice_only_picks_fitting_gpus() -> None:
    cluster = TraceCluster([TraceNode("n", 64000, 65536, 4, "G2")], seed=0)
    policy = POLICIES["random"](cluster, [], random.Random(0))
    cluster.place(0, TracePod("a", 0, 0, 1, 900, None), (0,))
    for number in range(20):
        pod = TracePod(f"s{number}", 0, 0, 1, 200, None)
        position, gpus = policy.choose(cluster, pod, cluster.feasible(pod))
        assert cluster.gpu_free[position][gpus[0]] >= 200
