"""The fleet's usage records on etcd: the metered intervals every host's agent publishes, read by
the API replicas for ``GET /v1/orgs/{org}/usage`` and the dashboard.

Each agent meters into its own SQLite (the source of truth for its host, crash-safe:
``hangar.agent.metering``) and publishes its intervals here (``hangar.fleet.usage``); a
replica only reads, so the write methods of :class:`UsageStore` are refused. Keys::

    usage-intervals/{id}                 the whole interval (``get_interval``)
    usage-open/{host}/{id}               the same while it is open (``open_intervals``)
    usage-days/{org}/{day}/{id}          the interval clipped to one UTC day (unix day, padded)
    usage-orgs/{org}                     an org that has pieces (for queries over every org)
    usage-published/{host}               when the host's last publishing cycle began

A window query reads the days it touches, one key range an org, so its cost grows with the
window and what ran in it, never with all history; an interval is returned once, merged from
its pieces in those days (its ``started_at``/``until`` clipped to them, so its seconds inside
the window are exact). Publishing is idempotent: every key is put whole from the agent's
record, which only moves forward; republishing writes the same values. ``prune`` drops
pieces and closed intervals older than the retention (the API's longest window).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from hangar.errors import StoreRejected
from hangar.model.usage import UsageInterval
from hangar.store.etcd.client import MAX_TXN_OPS, Delete, EtcdClient, Op, Put, Txn
from hangar.store.etcd.keys import KeyLayout, unsegment

DAY_S = 86400
RETENTION_S = 400 * DAY_S
"""How long published usage is kept: the usage API's longest window."""
_DAY_DIGITS = 6


def day_of(at: float) -> int:
    return max(0, math.floor(at / DAY_S))


def _day_name(day: int) -> str:
    return f"{day:0{_DAY_DIGITS}d}"


def pieces(interval: UsageInterval, from_day: int = 0) -> list[tuple[int, UsageInterval]]:
    """``interval`` cut at each UTC midnight, from ``from_day`` on: (day, piece)."""
    until = max(interval.until, interval.started_at)
    first = max(day_of(interval.started_at), from_day)
    return [
        (
            day,
            interval.model_copy(
                update={
                    "started_at": max(interval.started_at, float(day * DAY_S)),
                    "until": min(until, float((day + 1) * DAY_S)),
                }
            ),
        )
        for day in range(first, day_of(until) + 1)
    ]


def _refused(what: str) -> StoreRejected:
    return StoreRejected(f"{what}: an API replica meters nothing; each host's agent does")


class EtcdUsageStore:
    def __init__(self, client: EtcdClient, layout: KeyLayout | None = None) -> None:
        self._client = client
        self._layout = layout or KeyLayout()

    # -- keys -------------------------------------------------------------------------------

    def _head(self, interval_id: str) -> str:
        return self._layout.record("usage-intervals", interval_id)

    def _open(self, host: str, interval_id: str) -> str:
        return self._layout.record("usage-open", host, interval_id)

    def _org_days(self, org: str, day: int | None = None) -> str:
        if day is None:
            return self._layout.records("usage-days", org)
        return self._layout.records("usage-days", org, _day_name(day))

    # -- the agent's side -------------------------------------------------------------------

    def publish(self, interval: UsageInterval, from_time: float | None = None) -> int:
        """Write ``interval`` as the agent's store has it now (its pieces from the day of
        ``from_time`` on: the earlier ones were published whole already); how many keys."""
        oldest = day_of(interval.until) - RETENTION_S // DAY_S
        from_day = max(oldest, day_of(from_time) if from_time is not None else 0)
        body = interval.model_dump_json().encode()
        ops: list[Op] = [
            Put(self._org_days(interval.org, day) + piece.id, piece.model_dump_json().encode())
            for day, piece in pieces(interval, from_day)
        ]
        ops.append(Put(self._layout.record("usage-orgs", interval.org), b""))
        ops.append(Put(self._head(interval.id), body))
        open_key = self._open(interval.host, interval.id)
        ops.append(Delete(open_key) if interval.closed else Put(open_key, body))
        # Pieces first, the head and the open index last: a reader never sees an interval
        # closed whose last piece is not written yet.
        for start in range(0, len(ops), MAX_TXN_OPS):
            self._client.txn(Txn(success=tuple(ops[start : start + MAX_TXN_OPS])))
        return len(ops)

    def published_mark(self, host: str) -> float | None:
        """When ``host``'s last complete publishing cycle began (None: it never published)."""
        kv = self._client.get(self._layout.record("usage-published", host))
        return None if kv is None else float(kv.value)

    def mark_published(self, host: str, at: float) -> None:
        self._client.put(self._layout.record("usage-published", host), repr(at).encode())

    def prune(self, before: float) -> int:
        """Drop every org's pieces of the days before ``before`` and the closed intervals that
        ended before it; how many intervals were dropped."""
        day = day_of(before)
        for kv in self._client.range_prefix(self._layout.records("usage-orgs")).kvs:
            org = unsegment(kv.key.rsplit("/", 1)[-1])
            self._client.txn(
                Txn(success=(Delete(self._org_days(org), end=self._org_days(org, day)),))
            )
        old = [
            kv.key
            for kv in self._client.range_prefix(self._layout.records("usage-intervals")).kvs
            if (interval := UsageInterval.model_validate_json(kv.value)).closed
            and interval.until < before
        ]
        for start in range(0, len(old), MAX_TXN_OPS):
            self._client.txn(
                Txn(success=tuple(Delete(key) for key in old[start : start + MAX_TXN_OPS]))
            )
        return len(old)

    # -- UsageStore: what a replica reads ---------------------------------------------------

    def get_interval(self, interval_id: str) -> UsageInterval | None:
        kv = self._client.get(self._head(interval_id))
        return None if kv is None else UsageInterval.model_validate_json(kv.value)

    def open_intervals(self, host: str, machine_id: str | None = None) -> list[UsageInterval]:
        kvs = self._client.range_prefix(self._layout.records("usage-open", host)).kvs
        found = [UsageInterval.model_validate_json(kv.value) for kv in kvs]
        return sorted(
            (i for i in found if machine_id is None or i.machine_id == machine_id),
            key=lambda i: (i.started_at, i.id),
        )

    def intervals(self, org: str | None, start: float, end: float) -> list[UsageInterval]:
        if end <= start:
            return []
        if org is None:
            orgs = [
                unsegment(kv.key.rsplit("/", 1)[-1])
                for kv in self._client.range_prefix(self._layout.records("usage-orgs")).kvs
            ]
        else:
            orgs = [org]
        merged: dict[str, UsageInterval] = {}
        for name in orgs:
            kvs = self._client.range_between(
                self._org_days(name, day_of(start)), self._org_days(name, day_of(end) + 1)
            ).kvs
            for kv in kvs:  # day by day, so the later piece of an interval comes last
                piece = UsageInterval.model_validate_json(kv.value)
                seen = merged.get(piece.id)
                merged[piece.id] = (
                    piece
                    if seen is None
                    else piece.model_copy(update={"started_at": seen.started_at})
                )
        return sorted(
            (i for i in merged.values() if i.started_at < end and i.until > start),
            key=lambda i: (i.started_at, i.id),
        )

    # -- UsageStore: what only an agent writes ----------------------------------------------

    def open_interval(self, interval: UsageInterval) -> bool:
        raise _refused(f"opening usage interval {interval.id}")

    def checkpoint(self, interval_ids: Sequence[str], until: float) -> None:
        raise _refused("a usage checkpoint")

    def close_interval(self, interval_id: str, ended_at: float | None = None) -> bool:
        raise _refused(f"closing usage interval {interval_id}")
