"""Token buckets per (principal, action, target), as Fly documents for its Machines API: each
action on a machine allows 1 request/s with bursts of 3, Get Machine 5/s with bursts of 10.

Limits are configurable (``HANGAR_RATE_LIMITS="default=1/3,get_machine=5/10"``) so that a
test server can raise them; time comes from the injected clock.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from hangar.clock import Clock
from hangar.errors import RateLimited

MAX_BUCKETS = 10_000


@dataclass(frozen=True)
class RateLimit:
    per_second: float
    burst: int

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """``RATE/BURST``, e.g. ``1/3``."""
        rate, sep, burst = text.partition("/")
        try:
            limit = cls(float(rate), int(burst))
        except ValueError:
            raise ValueError(f"rate limit {text!r} is not RATE/BURST (e.g. 1/3)") from None
        if not sep or limit.per_second <= 0 or limit.burst < 1:
            raise ValueError(f"rate limit {text!r} needs a positive rate and a burst of 1 or more")
        return limit


FLY_DEFAULT = RateLimit(1.0, 3)
FLY_ACTIONS = {"get_machine": RateLimit(5.0, 10)}


@dataclass(frozen=True)
class RateLimits:
    default: RateLimit = FLY_DEFAULT
    actions: dict[str, RateLimit] = field(default_factory=lambda: dict(FLY_ACTIONS))

    def of(self, action: str) -> RateLimit:
        return self.actions.get(action, self.default)

    @classmethod
    def parse(cls, text: str) -> RateLimits:
        """``default=1/3,get_machine=5/10``: Fly's limits, with the named ones replaced."""
        default = FLY_DEFAULT
        actions = dict(FLY_ACTIONS)
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"rate limit {item!r} is not ACTION=RATE/BURST")
            if name.strip() == "default":
                default = RateLimit.parse(value.strip())
            else:
                actions[name.strip()] = RateLimit.parse(value.strip())
        return cls(default, actions)


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, limits: RateLimits, clock: Clock, max_buckets: int = MAX_BUCKETS) -> None:
        self.limits = limits
        self._clock = clock
        self._max_buckets = max_buckets
        self._buckets: dict[tuple[str, str, str], _Bucket] = {}

    @property
    def bucket_count(self) -> int:
        return len(self._buckets)

    def take(self, principal: str, action: str, target: str) -> None:
        """Spend one request of ``principal``'s bucket for ``action`` on ``target``, or raise
        RateLimited saying when the next one is allowed."""
        limit = self.limits.of(action)
        now = self._clock.monotonic()
        key = (principal, action, target)
        bucket = self._buckets.get(key)
        if bucket is None:
            self._forget_full_buckets(now)
            bucket = self._buckets[key] = _Bucket(float(limit.burst), now)
        bucket.tokens = min(
            float(limit.burst), bucket.tokens + (now - bucket.updated) * limit.per_second
        )
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return
        retry_after_s = (1.0 - bucket.tokens) / limit.per_second
        where = f" on {target}" if target else ""
        raise RateLimited(
            f"rate limited: {action}{where} allows {limit.per_second:g} request(s)/s with bursts "
            f"of {limit.burst}; retry in {retry_after_s:.2f}s",
            retry_after_s=retry_after_s,
            action=action,
        )

    def _forget_full_buckets(self, now: float) -> None:
        """Keep memory bounded: a bucket that has refilled is the same as no bucket."""
        if len(self._buckets) < self._max_buckets:
            return
        for key, bucket in list(self._buckets.items()):
            limit = self.limits.of(key[1])
            if bucket.tokens + (now - bucket.updated) * limit.per_second >= limit.burst:
                del self._buckets[key]


MAX_FLOODS = 1024
FLOOD_QUIET_S = 60.0


class FloodLog:
    """One log line per flood episode of ``key``, never one per refused request, line or
    connection: a flood must not fill the host's log as well. An episode ends once ``key``
    has had nothing refused for ``quiet_s``."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        quiet_s: float = FLOOD_QUIET_S,
        monotonic: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_FLOODS,
    ) -> None:
        self._log = logger
        self._what = what
        self._quiet_s = quiet_s
        self._monotonic = monotonic
        self._max_keys = max_keys
        self._active: OrderedDict[str, list[float]] = OrderedDict()
        """key -> [refused in this episode, when the last one was]"""

    def refused(self, key: str) -> int:
        """How many of ``key`` were refused in its current episode (0: none going on)."""
        episode = self._active.get(key)
        if episode is None or self._monotonic() - episode[1] > self._quiet_s:
            return 0
        return int(episode[0])

    def note(self, key: str, detail: str = "") -> bool:
        """Count one refused item of ``key``; True (and one log line) if an episode starts."""
        now = self._monotonic()
        episode = self._active.get(key)
        if episode is not None and now - episode[1] <= self._quiet_s:
            episode[0] += 1
            episode[1] = now
            self._active.move_to_end(key)
            return False
        while len(self._active) >= self._max_keys:
            self._active.popitem(last=False)
        self._active[key] = [1, now]
        self._active.move_to_end(key)
        suffix = f" ({detail})" if detail else ""
        self._log.warning(
            "%s: flood from %s%s; more are refused without a log line until it has been "
            "quiet for %gs",
            self._what,
            key,
            suffix,
            self._quiet_s,
        )
        return True
