"""Usage and cost of an org over a window, from the metered intervals (``GET
/v1/orgs/{org}/usage``), and the same as a time series for the dashboard's charts."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime

from pydantic import BaseModel, Field

from hangar.api.access import Access
from hangar.api.schemas import iso8601
from hangar.api.services.orgs import OrgService
from hangar.clock import Clock
from hangar.errors import InvalidRequest, Unprocessable
from hangar.model.usage import (
    NO_GPU,
    GroupBy,
    PriceTable,
    UsageAmounts,
    UsageInterval,
    group_key,
    unpriced,
)
from hangar.store.llm import LlmStore
from hangar.store.usage import UsageStore

DEFAULT_WINDOW_S = 30 * 24 * 3600.0
MAX_WINDOW_S = 400 * 24 * 3600.0
MAX_BUCKETS = 500


class UsageGroup(UsageAmounts):
    key: str


class ModelTokens(BaseModel):
    deployment: str
    name: str
    requests: int
    prompt_tokens: int
    completion_tokens: int


class UsageReport(BaseModel):
    org: str
    start: str = Field(serialization_alias="from")
    end: str = Field(serialization_alias="to")
    group_by: GroupBy
    currency: str
    groups: list[UsageGroup]
    total: UsageAmounts
    unpriced: list[str]
    """Resources used in the window that the operator's price table has no price for."""
    models: list[ModelTokens] = Field(default_factory=list)
    """Tokens the org's model deployments served in the window (``hangar llm``)."""


class UsageSeries(BaseModel):
    """Per bucket of ``bucket_s`` seconds from ``start``: one list of values per label."""

    start: float
    bucket_s: float
    gpu_hours: dict[str, list[float]]
    """GPU kind -> GPU-hours in each bucket."""
    machine_hours: dict[str, list[float]]
    """Org -> machine-hours in each bucket."""
    cost: dict[str, list[float]]
    """Org -> cost in each bucket."""


def parse_instant(value: str, field: str) -> float:
    """Unix seconds, or an RFC 3339 / ISO 8601 time (``2026-11-28T10:00:00Z``)."""
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise InvalidRequest(
            f"{field}: {value!r} is neither unix seconds nor an RFC 3339 time", field=field
        ) from None
    if parsed.tzinfo is None:
        raise InvalidRequest(f"{field}: {value!r} has no time zone (add Z)", field=field)
    return parsed.timestamp()


class UsageService:
    def __init__(
        self,
        store: UsageStore,
        orgs: OrgService,
        prices: PriceTable,
        clock: Clock,
        tokens: LlmStore | None = None,
    ) -> None:
        self._store = store
        self._tokens = tokens
        self._orgs = orgs
        self.prices = prices
        self._clock = clock

    def window(self, start: str | None, end: str | None) -> tuple[float, float]:
        until = parse_instant(end, "to") if end is not None else self._clock.now()
        since = parse_instant(start, "from") if start is not None else until - DEFAULT_WINDOW_S
        if since >= until:
            raise Unprocessable("from must be before to", field="from")
        if until - since > MAX_WINDOW_S:
            raise Unprocessable(
                f"the window may be at most {MAX_WINDOW_S / 86400:.0f} days", field="from"
            )
        return since, until

    def report(
        self,
        access: Access,
        org_slug: str,
        start: str | None,
        end: str | None,
        group_by: GroupBy,
    ) -> UsageReport:
        org = self._orgs.require(access, org_slug)
        since, until = self.window(start, end)
        groups: dict[str, UsageGroup] = {}
        total = UsageAmounts()
        missing: set[str] = set()
        for interval in self._store.intervals(org.slug, since, until):
            seconds = interval.seconds_within(since, until)
            if seconds <= 0:
                continue
            key = group_key(interval, group_by)
            groups.setdefault(key, UsageGroup(key=key)).add(interval, seconds, self.prices)
            total.add(interval, seconds, self.prices)
            missing.update(unpriced(interval, self.prices))
        return UsageReport(
            org=org.slug,
            start=iso8601(since),
            end=iso8601(until),
            group_by=group_by,
            currency=self.prices.currency,
            groups=[
                UsageGroup(key=key, **group.rounded().model_dump())
                for key, group in sorted(groups.items())
            ],
            total=total.rounded(),
            unpriced=sorted(missing),
            models=self._models(org.slug, since, until),
        )

    def _models(self, org: str, since: float, until: float) -> list[ModelTokens]:
        if self._tokens is None:
            return []
        names = {d.id: d.name for d in self._tokens.list_deployments(org)}
        return [
            ModelTokens(
                deployment=deployment,
                name=names.get(deployment, ""),
                **totals.model_dump(),
            )
            for deployment, totals in self._tokens.tokens_by_deployment(org, since, until).items()
        ]

    def series(self, org: str | None, since: float, until: float, buckets: int) -> UsageSeries:
        """GPU-hours by kind, machine-hours and cost by org, in ``buckets`` equal buckets of
        ``[since, until)`` (``org`` None: every org)."""
        buckets = max(1, min(MAX_BUCKETS, buckets))
        width = (until - since) / buckets
        gpu: dict[str, list[float]] = defaultdict(lambda: [0.0] * buckets)
        machine: dict[str, list[float]] = defaultdict(lambda: [0.0] * buckets)
        cost: dict[str, list[float]] = defaultdict(lambda: [0.0] * buckets)
        for interval in self._store.intervals(org, since, until):
            for index, seconds in _spread(interval, since, width, buckets):
                amounts = UsageAmounts()
                amounts.add(interval, seconds, self.prices)
                if interval.gpus:
                    gpu[interval.gpu_kind or NO_GPU][index] += amounts.gpu_seconds / 3600
                machine[interval.org][index] += amounts.seconds / 3600
                cost[interval.org][index] += amounts.cost
        return UsageSeries(
            start=since,
            bucket_s=width,
            gpu_hours=dict(sorted(gpu.items())),
            machine_hours=dict(sorted(machine.items())),
            cost=dict(sorted(cost.items())),
        )


def _spread(
    interval: UsageInterval, since: float, width: float, buckets: int
) -> list[tuple[int, float]]:
    """(bucket, seconds) of ``interval`` in each bucket it touches."""
    first = max(0, int((interval.started_at - since) // width))
    last = min(buckets - 1, int((interval.until - since) // width))
    spread = []
    for index in range(first, last + 1):
        low = since + index * width
        seconds = interval.seconds_within(low, low + width)
        if seconds > 0:
            spread.append((index, seconds))
    return spread
