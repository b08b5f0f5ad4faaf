from __future__ import annotations

from hangar.scheduler.pressure import LEVEL_STEP, kind_levels


def test_a_kind_wanted_by_requests_that_need_it_ranks_above_the_others() -> None:
    demand = {frozenset({"t4"}): 900.0, None: 4000.0}
    levels = kind_levels(demand, {"t4": 800, "g2": 4400})
    assert levels["t4"] > levels["g2"]


def test_flexible_demand_alone_puts_every_kind_on_one_level() -> None:
    levels = kind_levels({None: 1000.0}, {"t4": 800, "g2": 4400, "a10": 200})
    assert len(set(levels.values())) == 1


def test_no_demand_means_no_pressure() -> None:
    assert kind_levels({}, {"t4": 800, "g2": 0}) == {"t4": 0, "g2": 0}


def test_demand_narrowed_by_a_bottleneck_is_added_up_not_overwritten() -> None:
    # Once "a" is the bottleneck, requests for {"b"} and for {"a", "b"} both need "b" alone.
    demand: dict[frozenset[str] | None, float] = {
        frozenset({"a"}): 3000.0,
        frozenset({"b"}): 400.0,
        frozenset({"a", "b"}): 500.0,
    }
    free = {"a": 1000, "b": 1000, "c": 2000}
    levels = kind_levels(demand, free)
    scale = sum(free.values()) / sum(demand.values())
    assert levels["a"] == round(3000 * scale / 1000 / LEVEL_STEP)
    assert levels["b"] == round(900 * scale / 1000 / LEVEL_STEP)
    assert levels["c"] == 0
