"""The replay with arrivals and departures: the stream, the queue, both platforms, the bench."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hangar.bench.trace import app
from hangar.scheduler.mig import profile_milli
from hangar.scheduler.replay import (
    FLY,
    HANGAR,
    Arrival,
    ReplayConfig,
    Stream,
    build_stream,
    replay_hosts,
    replay_platform,
    replay_request,
    replay_seed,
)
from hangar.scheduler.replay_bench import run_replay_bench
from hangar.scheduler.trace import TraceNode, TracePod, load_nodes, load_pods

FIXTURES = Path(__file__).parent / "fixtures"
NODES_CSV = FIXTURES / "openb_nodes_all_slice.csv"
PODS_CSV = FIXTURES / "openb_pods_timed_slice.csv"
NODES = load_nodes(NODES_CSV)
PODS = load_pods(PODS_CSV)
CAPACITY = sum(node.gpus for node in NODES) * 1000
NO_MIG = ReplayConfig(slice_percent=0)


def pod(name: str, gpus: int = 1, milli: int = 1000, cpu: int = 1000) -> TracePod:
    return TracePod(name, cpu, 1024, gpus, milli if gpus else 0, None, 0, 100)


def stream(*arrivals: tuple[float, TracePod, float], window: float = 100.0) -> Stream:
    return Stream(
        tuple(Arrival(n, time, p, life) for n, (time, p, life) in enumerate(arrivals)),
        (0.0, window),
        1.0,
        0.0,
    )


ONE_GPU = [TraceNode("n1", 8000, 16384, 1, "T4")]


def test_the_fixture_has_times_cpu_hosts_and_mig_nodes() -> None:
    assert all(p.lifetime is not None and p.lifetime >= 1 for p in PODS)
    assert any(not node.gpus for node in NODES)
    assert any(node.model == "G3" for node in NODES)


def test_the_stream_is_deterministic_and_offers_the_asked_load() -> None:
    config = ReplayConfig(passes=3, warmup_passes=1, load=0.8)
    first = build_stream(PODS, CAPACITY, 5, config)
    assert first == build_stream(PODS, CAPACITY, 5, config)
    assert first != build_stream(PODS, CAPACITY, 6, config)
    assert len(first.arrivals) == 3 * len(PODS)
    times = [a.time for a in first.arrivals]
    assert times == sorted(times)
    assert first.offered_milli == pytest.approx(0.8 * CAPACITY, rel=1e-3)
    low, high = first.window
    assert high >= times[-1] and low == pytest.approx(high / 3), "one warm-up pass of three"
    by_name = {p.name: p for p in PODS}
    assert all(a.lifetime == by_name[a.pod.name].lifetime for a in first.arrivals)


def test_slice_asks_are_the_smallest_covering_profile_of_the_layout() -> None:
    config = ReplayConfig(slice_percent=100)
    arrivals = build_stream(PODS, CAPACITY, 1, config).arrivals
    sliced = [a for a in arrivals if a.gpu_slice]
    assert sliced
    for arrival in sliced:
        assert arrival.pod.is_share
        share = arrival.pod.gpu_milli
        assert profile_milli(arrival.gpu_slice) >= share
        smaller = [p for p in config.mig_layout if share <= profile_milli(p)]
        assert profile_milli(arrival.gpu_slice) == min(profile_milli(p) for p in smaller)
    big_shares = [a for a in arrivals if a.pod.is_share and a.pod.gpu_milli > 428]
    assert big_shares and not any(a.gpu_slice for a in big_shares)


def test_only_hangar_sets_gpus_up_for_mig() -> None:
    config = ReplayConfig(mig_fraction=0.5)
    fly = {h.id: h for h in replay_hosts(NODES, config, FLY)}
    ours = {h.id: h for h in replay_hosts(NODES, config, HANGAR)}
    g3 = [node for node in NODES if node.model == "G3"]
    for node in g3:
        assert {gpu.kind for gpu in ours[node.name].gpus} == {"a100-sxm4-80gb"}
        assert sum(1 for gpu in ours[node.name].gpus if gpu.mig_layout) == node.gpus // 2
        assert not any(gpu.mig_layout for gpu in fly[node.name].gpus)
    assert all(not h.allow_cpu_machines for h in ours.values())


def test_requests_on_each_platform() -> None:
    config = ReplayConfig()
    share_pod = TracePod("s", 2000, 1024, 1, 250, frozenset({"G3", "T4"}), 0, 10)
    plain = Arrival(0, 0.0, share_pod, 10.0)
    sliced = Arrival(1, 0.0, share_pod, 10.0, "2g.20gb")
    fly = replay_request(plain, config, FLY, "m")
    assert (fly.gpus, fly.gpu_milli, fly.gpu_kinds) == (1, 0, frozenset({"a100-sxm4-80gb", "T4"}))
    ours = replay_request(plain, config, HANGAR, "m")
    assert (ours.gpus, ours.gpu_milli, ours.gpu_slice) == (0, 250, "")
    cut = replay_request(sliced, config, HANGAR, "m")
    assert (cut.gpu_slice, cut.gpu_kinds) == ("2g.20gb", frozenset({"a100-sxm4-80gb"}))
    assert replay_request(sliced, config, FLY, "m").gpus == 1


def test_shares_fill_one_gpu_on_hangar_and_wait_on_fly() -> None:
    arrivals = stream((0, pod("a", milli=500), 100), (0, pod("b", milli=500), 100))
    fly = replay_platform(ONE_GPU, arrivals, FLY, NO_MIG)
    ours = replay_platform(ONE_GPU, arrivals, HANGAR, NO_MIG)
    assert ours.allocation == pytest.approx(100.0) and ours.waited == 0
    assert fly.allocation == pytest.approx(50.0) and fly.held == pytest.approx(100.0)
    assert fly.waited == 1 and fly.refused == 0


def test_a_waiting_request_starts_when_a_departure_frees_its_host() -> None:
    arrivals = stream((0, pod("a"), 40), (10, pod("b"), 100))
    result = replay_platform(ONE_GPU, arrivals, HANGAR, NO_MIG)
    assert result.waited == 1 and result.refused == 0
    assert result.allocation == pytest.approx(100.0), "b starts at 40 and runs past the window"


def test_the_queue_is_bounded_and_waiting_is_bounded() -> None:
    full = ReplayConfig(slice_percent=0, max_queue=1)
    arrivals = stream((0, pod("a"), 1000), (1, pod("b"), 10), (2, pod("c"), 10))
    result = replay_platform(ONE_GPU, arrivals, HANGAR, full)
    assert (result.waited, result.refused) == (1, 1), "c finds the queue full"
    patient = ReplayConfig(slice_percent=0, max_wait_s=20)
    arrivals = stream((0, pod("a"), 50), (1, pod("b"), 10), (60, pod("c", gpus=0), 1))
    result = replay_platform(ONE_GPU, arrivals, HANGAR, patient)
    assert (result.waited, result.refused) == (0, 1), "b gave up before a left"


def test_waiting_is_fifo_without_blocking_the_line() -> None:
    two = [TraceNode("n1", 8000, 16384, 2, "T4")]
    arrivals = stream(
        (0, pod("a"), 30),
        (0, pod("b"), 1000),
        (1, pod("big", gpus=2), 10),
        (2, pod("small"), 10),
        window=60,
    )
    result = replay_platform(two, arrivals, HANGAR, NO_MIG)
    assert result.waited == 2 and result.refused == 0
    assert result.allocation == pytest.approx(100 * (30 * 2 + 10 * 2 + 20 * 1) / 120)


def test_both_platforms_on_the_fixture_keep_their_invariants() -> None:
    outcome = replay_seed(NODES, PODS, 3, ReplayConfig(slice_percent=20))
    assert outcome.offered == pytest.approx(100.0, rel=1e-3)
    fly, ours = outcome.outcome(FLY), outcome.outcome(HANGAR)
    assert fly.gpu_requests == ours.gpu_requests > 0
    for result in (fly, ours):
        assert 0 < result.allocation <= result.held + 1e-9 <= 100 + 1e-9
        assert result.waited + result.refused <= result.gpu_requests
    assert fly.held > fly.allocation, "fly-style holds whole GPUs for shares"
    assert ours.slices > 0
    assert replay_seed(NODES, PODS, 3, ReplayConfig(slice_percent=20)) == outcome


def test_replay_bench_table_and_json() -> None:
    lines: list[str] = []
    result = run_replay_bench(NODES_CSV, PODS_CSV, [1, 2], progress=lines.append)
    assert len(lines) == 2 and len(result.seeds) == 2
    table = result.table().splitlines()
    assert table[-1] == f"ratio hangar/fly-style: {result.ratio:.2f}"
    assert re.fullmatch(r"ratio hangar/fly-style: \d+\.\d\d", table[-1])
    assert any(line.startswith("fly-style: whole GPUs only") for line in table)
    assert any(line.startswith("MIG (hangar only)") for line in table)
    ours, fly = result.summary(HANGAR), result.summary(FLY)
    assert result.ratio == pytest.approx(ours.median_allocation / fly.median_allocation)
    assert f"median alloc % over the seeds: hangar {ours.median_allocation:.2f}, " in "\n".join(
        table
    )
    document = result.to_json()
    assert document["ratio_hangar_over_fly_style"] == round(result.ratio, 4)
    assert [seed["seed"] for seed in document["seeds"]] == [1, 2]


def test_replay_command() -> None:
    args = ["replay", "--nodes", str(NODES_CSV), "--pods", str(PODS_CSV), "--seeds", "1"]
    result = CliRunner().invoke(app, [*args, "--json", "--mig-layout", "1g.10gbx7"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["config"]["mig_layout"] == ["1g.10gb"] * 7
    assert set(document["summary"]) == {FLY, HANGAR}
    bad = CliRunner().invoke(app, [*args, "--mig-layout", "4g.40gbx2"])
    assert bad.exit_code != 0
    assert CliRunner().invoke(app, ["replay", "--seeds", "1"]).exit_code != 0
    untimed = [
        "replay",
        "--nodes",
        str(NODES_CSV),
        "--pods",
        str(FIXTURES / "openb_pods_slice.csv"),
    ]
    assert CliRunner().invoke(app, untimed).exit_code != 0
