from __future__ import annotations

from hangar.scheduler import PlacementRequest, WorkloadProfile
from tests.scheduler.fleet import share, whole


def _shares(*sizes_and_counts: tuple[int, int]) -> list[PlacementRequest]:
    return [share(f"s{size}-{n}", size) for size, count in sizes_and_counts for n in range(count)]


def test_typical_share_sizes_cover_the_mix_and_drop_rare_sizes() -> None:
    profile = WorkloadProfile.from_requests(_shares((500, 60), (300, 30), (150, 6), (40, 4)))
    assert profile.typical_share_sizes == (300, 500)


def test_gap_waste_is_what_typical_sizes_cannot_fill() -> None:
    profile = WorkloadProfile.from_requests(_shares((500, 60), (300, 40)))
    waste = profile.gap_waste
    assert waste[1000] == 0  # 500 + 500
    assert waste[800] == 0  # 500 + 300
    assert waste[700] == 100  # 600 at best
    assert waste[250] == 250


def test_the_gap_cost_prefers_leaving_a_fillable_gap_over_a_dead_one() -> None:
    profile = WorkloadProfile.from_requests(_shares((500, 60), (300, 40)))
    # a 300 slice on a GPU with 600 free leaves 300 (fillable); on one with 500 free, 200 (dead)
    assert profile.share_gap_cost(600, 300) < profile.share_gap_cost(500, 300)
    # and a perfect fit beats opening a fresh GPU
    assert profile.share_gap_cost(300, 300) < profile.share_gap_cost(1000, 300)


def test_an_empty_profile_is_best_fit() -> None:
    profile = WorkloadProfile.empty()
    costs = [profile.share_gap_cost(gap, 200) for gap in (1000, 600, 250, 200)]
    assert costs == sorted(costs, reverse=True)
    assert profile.cpu_per_gpu_milli == 0.0


def test_cpu_per_gpu_is_volume_weighted() -> None:
    profile = WorkloadProfile.from_requests(
        [whole("a", gpus=2, cpu=16), share("b", 500, cpu=1), share("c", 500, cpu=1)]
    )
    assert profile.cpu_per_gpu_milli == (16000 + 1000 + 1000) / 3000


def test_kind_demand_and_multi_gpu_shapes() -> None:
    profile = WorkloadProfile.from_requests(
        [whole("a", gpus=4, kinds=("h100",)), whole("b", kinds=("h100", "a10")), share("c", 250)]
    )
    assert profile.kind_demand == {
        frozenset({"h100"}): 4000.0,
        frozenset({"h100", "a10"}): 1000.0,
        None: 250.0,
    }
    assert [shape.gpus for shape in profile.multi_gpu_shapes] == [4]
