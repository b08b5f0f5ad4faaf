"""What each agent publishes about its metered usage, for the API replicas' usage reports.

The agent keeps metering into its own SQLite (``UsageMeter``: the source of truth for its
host, crash-safe); a thread of this publisher copies what changed there to etcd
(:class:`EtcdUsageStore`) every ``period_s``:

- every interval of the host that was in use since the last cycle that reached etcd (its
  ``until`` is later): opened, checkpointed or closed since. Where the last cycle began is
  kept in etcd (``published_mark``), so an agent that restarts carries on from there, and one
  that never published (a host new to the fleet, or one from before publishing) publishes
  what it metered within the retention once;
- every interval etcd still shows open for this host that the local store has closed (or no
  longer has): closed there too, so an interval closed while etcd was away, or by the agent's
  ``recover`` at a checkpoint older than the last cycle, is never left open.

Republishing is harmless (every key is written whole from the local record, which only moves
forward), so a cycle that fails is simply run again; the point it starts from moves only when
a cycle succeeded. Once a day the cycle also prunes what is past the retention.
"""

from __future__ import annotations

import logging
import threading

from hangar.clock import Clock
from hangar.errors import StoreError
from hangar.model.usage import UsageInterval
from hangar.store.etcd.usage import DAY_S, RETENTION_S, EtcdUsageStore
from hangar.store.usage import UsageStore

log = logging.getLogger(__name__)

MARGIN_S = 1.0
"""Intervals whose ``until`` is this close before the last cycle are sent again."""
PRUNE_EVERY_S = float(DAY_S)


class UsagePublisher:
    def __init__(
        self,
        fleet: EtcdUsageStore,
        local: UsageStore,
        host_id: str,
        clock: Clock,
        period_s: float,
    ) -> None:
        self._fleet = fleet
        self._local = local
        self._host_id = host_id
        self._clock = clock
        self.period_s = period_s
        self._since: float | None = None
        self._published: dict[str, float] = {}
        """Open intervals' ``until`` as last published (their earlier day pieces are done)."""
        self._pruned_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="usage publisher", daemon=True)
        self.cycles = 0

    def publish_once(self) -> int:
        """One cycle; how many intervals it wrote. Raises ``StoreError`` when etcd does not
        answer (nothing is lost: the next cycle starts from the same point)."""
        now = self._clock.now()
        if self._since is None:
            mark = self._fleet.published_mark(self._host_id)
            self._since = mark if mark is not None else now - RETENTION_S
        since = self._since
        changed: dict[str, UsageInterval] = {
            i.id: i
            for i in self._local.intervals(None, since - MARGIN_S, float("inf"))
            if i.host == self._host_id
        }
        for interval in self._local.open_intervals(self._host_id):
            changed[interval.id] = interval
        for remote in self._fleet.open_intervals(self._host_id):
            if remote.id not in changed:
                local = self._local.get_interval(remote.id)
                changed[remote.id] = local or remote.model_copy(update={"closed": True})
        for interval in changed.values():
            self._fleet.publish(interval, self._published.get(interval.id))
            if interval.closed:
                self._published.pop(interval.id, None)
            else:
                self._published[interval.id] = interval.until
        self._fleet.mark_published(self._host_id, now)
        self._since = now
        if self._pruned_at is None or now - self._pruned_at >= PRUNE_EVERY_S:
            self._fleet.prune(now - RETENTION_S)
            self._pruned_at = now
        self.cycles += 1
        return len(changed)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop, after a last cycle (bounded by the etcd client's timeout)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30.0)

    def _cycle(self) -> None:
        try:
            self.publish_once()
        except StoreError as error:
            log.warning("usage of host %s not published yet: %s", self._host_id, error)

    def _work(self) -> None:
        self._cycle()
        while not self._stop.wait(self.period_s):
            self._cycle()
        self._cycle()  # the last one, as the agent stops
