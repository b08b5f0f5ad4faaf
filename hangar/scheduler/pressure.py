"""Kind pressure: which GPU kinds are wanted by requests that can use nothing else.

Expected demand (the profile's GPU volume by accepted-kind set, scaled to the free capacity
left) is spread over kinds by progressive filling: the set of kinds whose own demand is the
largest fraction of its free capacity is the bottleneck; it gets that fraction as its level,
leaves, and the rest is filled again. A request that accepts several kinds goes to the kind
with the lowest level first, leaving oversubscribed kinds to the requests that need them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import combinations

LEVEL_STEP = 0.05
"""Levels closer than this are the same level (other criteria decide between the kinds)."""
MAX_EXACT_KINDS = 12


def kind_levels(
    kind_demand: Mapping[frozenset[str] | None, float], free_milli: Mapping[str, int]
) -> dict[str, int]:
    """Quantised pressure level for each kind in ``free_milli`` (lower is preferred)."""
    kinds = sorted(kind for kind, free in free_milli.items() if free > 0)
    levels = {kind: 0 for kind in free_milli}
    all_kinds = frozenset(free_milli)
    demand: dict[frozenset[str], float] = {}
    for accepted, volume in kind_demand.items():
        usable = all_kinds if accepted is None else accepted & all_kinds
        if usable:
            demand[usable] = demand.get(usable, 0.0) + volume
    total_demand = sum(demand.values())
    if not kinds or total_demand <= 0:
        return levels
    horizon = sum(free_milli[kind] for kind in kinds)
    remaining = {accepted: volume / total_demand * horizon for accepted, volume in demand.items()}
    left = kinds
    while left:
        ratio, bottleneck = _bottleneck(left, remaining, free_milli)
        for kind in bottleneck:
            levels[kind] = round(ratio / LEVEL_STEP)
        left = [kind for kind in left if kind not in bottleneck]
        narrowed: dict[frozenset[str], float] = {}
        for accepted, volume in remaining.items():
            if not accepted <= bottleneck:
                rest = accepted - bottleneck
                narrowed[rest] = narrowed.get(rest, 0.0) + volume
        remaining = narrowed
    return levels


def _bottleneck(
    left: list[str], remaining: Mapping[frozenset[str], float], free_milli: Mapping[str, int]
) -> tuple[float, frozenset[str]]:
    candidates: Iterable[frozenset[str]]
    if len(left) <= MAX_EXACT_KINDS:
        candidates = (
            frozenset(subset)
            for size in range(1, len(left) + 1)
            for subset in combinations(left, size)
        )
    else:
        left_set = frozenset(left)
        unions = (
            {frozenset([kind]) for kind in left}
            | {accepted & left_set for accepted in remaining if accepted & left_set}
            | {left_set}
        )
        candidates = sorted(unions, key=lambda subset: (len(subset), sorted(subset)))
    best_ratio = -1.0
    best: frozenset[str] = frozenset(left)
    for subset in candidates:
        capacity = sum(free_milli[kind] for kind in subset)
        wanted = sum(
            volume for accepted, volume in remaining.items() if accepted and accepted <= subset
        )
        ratio = wanted / capacity
        if ratio > best_ratio + 1e-12:
            best_ratio, best = ratio, subset
    return best_ratio, best
