"""Token buckets on an injected clock: Fly's documented limits, without sleeping."""

from __future__ import annotations

import pytest

from hangar.clock import ManualClock
from hangar.errors import RateLimited
from hangar.ratelimit import RateLimit, RateLimiter, RateLimits


def allowed(limiter: RateLimiter, count: int, action: str = "stop_machine") -> int:
    granted = 0
    for _ in range(count):
        try:
            limiter.take("tok_a", action, "m1")
            granted += 1
        except RateLimited:
            pass
    return granted


def test_fly_defaults_allow_bursts_of_3_then_1_per_second() -> None:
    clock = ManualClock()
    limiter = RateLimiter(RateLimits(), clock)
    assert allowed(limiter, 10) == 3
    with pytest.raises(RateLimited) as refused:
        limiter.take("tok_a", "stop_machine", "m1")
    assert refused.value.retry_after_s == pytest.approx(1.0)
    assert refused.value.http_status == 429
    assert "stop_machine" in refused.value.message
    clock.advance(0.5)
    assert allowed(limiter, 1) == 0
    clock.advance(0.5)
    assert allowed(limiter, 5) == 1
    clock.advance(60)
    assert allowed(limiter, 10) == 3


def test_get_machine_allows_5_per_second_with_bursts_of_10() -> None:
    clock = ManualClock()
    limiter = RateLimiter(RateLimits(), clock)
    assert allowed(limiter, 20, "get_machine") == 10
    clock.advance(1.0)
    assert allowed(limiter, 20, "get_machine") == 5


def test_buckets_are_per_token_action_and_machine() -> None:
    limiter = RateLimiter(RateLimits(), ManualClock())
    assert allowed(limiter, 3) == 3
    limiter.take("tok_b", "stop_machine", "m1")
    limiter.take("tok_a", "start_machine", "m1")
    limiter.take("tok_a", "stop_machine", "m2")
    with pytest.raises(RateLimited):
        limiter.take("tok_a", "stop_machine", "m1")


def test_memory_stays_bounded_by_forgetting_refilled_buckets() -> None:
    clock = ManualClock()
    limiter = RateLimiter(RateLimits(), clock, max_buckets=10)
    for machine in range(10):
        limiter.take("tok_a", "stop_machine", f"m{machine}")
    clock.advance(10)
    limiter.take("tok_a", "stop_machine", "new")
    assert limiter.bucket_count == 1


def test_limits_parse_and_refuse_nonsense() -> None:
    limits = RateLimits.parse("default=2/4, get_machine=50/100")
    assert limits.of("stop_machine") == RateLimit(2.0, 4)
    assert limits.of("get_machine") == RateLimit(50.0, 100)
    assert RateLimits.parse("") == RateLimits()
    for text in ("default=1", "default=0/3", "x=1/0", "nonsense"):
        with pytest.raises(ValueError):
            RateLimits.parse(text)
