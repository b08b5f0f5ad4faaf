"""The metrics of one server, on its own registry, and the observers that feed them.

:class:`HangarMetrics` is, at once, the run engine's ``RunObserver``, the scheduler's
``PlacementObserver``, the request guard's ``RequestObserver`` and the image cache's
``ImageCacheObserver``: those modules know only their protocol, never Prometheus.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from hangar.clock import Clock, SystemClock
from hangar.model.run import RunRecord, RunStatus
from hangar.scheduler import PlacementOutcome

STEP_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OPERATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
REQUEST_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60)
START_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300)

BOOT_FROM = "mark_starting"
BOOT_TO = "mark_started"
START_MODES = ("boot", "resume")
"""``resume`` (from a suspend snapshot) is observed once machines can be suspended."""

CONTENT_TYPE = CONTENT_TYPE_LATEST


class HangarMetrics:
    def __init__(self, clock: Clock | None = None) -> None:
        self.registry = CollectorRegistry()
        self._clock = clock or SystemClock()
        self._boots: dict[str, float] = {}
        r = self.registry
        self.operations = Counter(
            "hangar_operations",
            "Agent operations (durable runs) that finished, by operation and final status.",
            ["operation", "status"],
            registry=r,
        )
        self.operation_seconds = Histogram(
            "hangar_operation_duration_seconds",
            "Time from an operation's submission to its end (a crash in between included).",
            ["operation"],
            buckets=OPERATION_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "hangar_step_duration_seconds",
            "Time each step of an operation took when it had work to do "
            "(rollback steps as rollback:NAME).",
            ["operation", "step"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.step_retries = Counter(
            "hangar_step_retries",
            "Retries of steps that failed with a retryable error.",
            ["operation", "step"],
            registry=r,
        )
        self.step_failures = Counter(
            "hangar_step_failures",
            "Steps that failed (a forward step's failure rolls its run back).",
            ["operation", "step"],
            registry=r,
        )
        self.api_requests = Counter(
            "hangar_api_requests",
            "API requests by route (the operation's name), method and HTTP status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.api_seconds = Histogram(
            "hangar_api_request_duration_seconds",
            "Time from a request's arrival to its end (streams included).",
            ["route"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.rate_limited_requests = Counter(
            "hangar_api_rate_limited",
            "Requests refused by the rate limit (429), by route.",
            ["route"],
            registry=r,
        )
        self.placements = Counter(
            "hangar_placement_attempts",
            "Placements by outcome: placed, insufficient_capacity, lost_races.",
            ["outcome"],
            registry=r,
        )
        self.placement_conflicts = Counter(
            "hangar_placement_conflicts",
            "Claims that lost a compare-and-set to another writer and were tried again.",
            registry=r,
        )
        self.image_lookups = Counter(
            "hangar_image_cache_lookups",
            "Image rootfs cache lookups: hit (cached) or miss (pulled and built).",
            ["result"],
            registry=r,
        )
        self.guest_start_seconds = Histogram(
            "hangar_guest_start_seconds",
            "Time from a machine leaving for starting to it being started, by mode "
            "(boot; resume from a snapshot).",
            ["mode"],
            buckets=START_BUCKETS,
            registry=r,
        )
        for outcome in ("placed", "insufficient_capacity", "lost_races"):
            self.placements.labels(outcome)
        for result in ("hit", "miss"):
            self.image_lookups.labels(result)
        for mode in START_MODES:
            self.guest_start_seconds.labels(mode)

    def register(self, collector: Collector) -> None:
        self.registry.register(collector)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)

    # RunObserver
    def step_started(self, run: RunRecord, step: str) -> None:
        if step == BOOT_FROM:
            self._boots[run.id] = self._clock.monotonic()

    def step_finished(
        self, run: RunRecord, step: str, ran: bool, seconds: float, error: BaseException | None
    ) -> None:
        if error is not None:
            self.step_failures.labels(run.operation, step).inc()
        if ran:
            self.step_seconds.labels(run.operation, step).observe(seconds)
        if step == BOOT_TO and error is None:
            began = self._boots.pop(run.id, None)
            if began is not None:
                self.guest_started("boot", self._clock.monotonic() - began)

    def guest_started(self, mode: str, seconds: float) -> None:
        """A guest is running ``seconds`` after it was asked to: ``boot`` or ``resume``."""
        self.guest_start_seconds.labels(mode).observe(seconds)

    def step_retried(self, run: RunRecord, step: str, error: BaseException) -> None:
        self.step_retries.labels(run.operation, step).inc()

    def run_finished(self, run: RunRecord) -> None:
        self._boots.pop(run.id, None)
        status = str(run.status) if run.status in (RunStatus.SUCCEEDED, RunStatus.FAILED) else ""
        self.operations.labels(run.operation, status).inc()
        self.operation_seconds.labels(run.operation).observe(
            max(0.0, run.updated_at - run.created_at)
        )

    # PlacementObserver
    def placement_conflict(self, host_id: str) -> None:
        self.placement_conflicts.inc()

    def placement_finished(self, outcome: PlacementOutcome) -> None:
        self.placements.labels(outcome).inc()

    # RequestObserver
    def api_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.api_requests.labels(route, method, str(status)).inc()
        self.api_seconds.labels(route).observe(seconds)

    def rate_limited(self, route: str) -> None:
        self.rate_limited_requests.labels(route).inc()

    # ImageCacheObserver
    def image_lookup(self, hit: bool) -> None:
        self.image_lookups.labels("hit" if hit else "miss").inc()
