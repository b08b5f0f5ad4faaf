"""An in-process copy of every key under an etcd prefix, loaded once and kept current by a watch.

``PrefixCache`` reads the prefix in pages at one revision, then watches it from the next
revision on, so it holds exactly what etcd held at ``revision`` (and later, as events arrive).
Values are decoded on first use and only the newest value of a key is ever decoded: a cache of
10,000 hosts that sees a thousand writes a second decodes only what its reader asks for.

Reads (``get``, ``snapshot``) never touch etcd, so they keep answering while etcd is
unavailable (the answer is then as of ``revision``; ``connected`` says whether the watch is
live). Writers call ``note`` with what they wrote, so a process reads its own writes at once;
a watch event older than a noted value is ignored.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from hangar.store.etcd.client import EtcdClient, KeyValue
from hangar.store.etcd.watch import Watch, WatchEvent

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CacheChange:
    """One key changed: ``kv`` is its new value, or (``deleted``) the deleting revision."""

    name: str
    kv: KeyValue
    deleted: bool


class _Entry(Generic[T]):
    __slots__ = ("decoded", "kv")

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self.decoded: T | None = None


class PrefixCache(Generic[T]):
    def __init__(
        self,
        client: EtcdClient,
        prefix: str,
        decode: Callable[[KeyValue], T],
        *,
        on_change: Callable[[Sequence[CacheChange]], None] | None = None,
        page_size: int = 1000,
    ) -> None:
        self._client = client
        self.prefix = prefix
        self._decode = decode
        self._on_change = on_change
        self._page_size = page_size
        self._entries: dict[str, _Entry[T]] = {}
        self._revision = 0
        self._changed = threading.Condition(threading.RLock())
        self._watch: Watch | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Load the prefix and start watching it (raises ``StoreUnavailable`` if etcd is)."""
        revision = self._reload()
        self._watch = Watch(
            self._client,
            self.prefix,
            start_revision=revision + 1,
            on_events=self._apply,
            on_compacted=lambda _oldest: self._reload() + 1,
            name=f"cache {self.prefix}",
        )
        self._watch.start()

    def close(self) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None

    @property
    def connected(self) -> bool:
        return self._watch is not None and self._watch.connected

    @property
    def revision(self) -> int:
        """Every change up to this revision is in the cache."""
        with self._changed:
            return self._revision

    # -- reads -------------------------------------------------------------------------------

    def get(self, name: str) -> T | None:
        with self._changed:
            entry = self._entries.get(name)
            return None if entry is None else self._value(entry)

    def get_kv(self, name: str) -> KeyValue | None:
        with self._changed:
            entry = self._entries.get(name)
            return None if entry is None else entry.kv

    def names(self) -> list[str]:
        with self._changed:
            return list(self._entries)

    def snapshot(self) -> dict[str, T]:
        with self._changed:
            return {name: self._value(entry) for name, entry in self._entries.items()}

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Wait (bounded) until ``predicate`` holds; it is checked after every change."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True

    def wait_revision(self, revision: int, timeout_s: float) -> bool:
        return self.wait_until(lambda: self._revision >= revision, timeout_s)

    # -- writes seen by this process ----------------------------------------------------------

    def note(self, kv: KeyValue, decoded: T | None = None) -> None:
        """A value this process wrote or read fresh (``decoded``: its value, when known). Once
        the watch has passed its revision the cache already holds it or something newer (a
        delete included), so it is dropped."""
        changes: list[CacheChange] = []
        with self._changed:
            if kv.mod_revision > self._revision:
                self._apply_one(kv, deleted=False, notify=changes)
                entry = self._entries.get(self._name(kv.key))
                if decoded is not None and entry is not None and entry.kv is kv:
                    entry.decoded = decoded
        self._notify(changes)

    def _value(self, entry: _Entry[T]) -> T:
        if entry.decoded is None:
            entry.decoded = self._decode(entry.kv)
        return entry.decoded

    def _reload(self) -> int:
        result = self._client.range_prefix(self.prefix, page_size=self._page_size)
        changes: list[CacheChange] = []
        with self._changed:
            fresh = {self._name(kv.key): kv for kv in result.kvs}
            for name, entry in self._entries.items():
                if name not in fresh and entry.kv.mod_revision <= result.revision:
                    changes.append(CacheChange(name, entry.kv, deleted=True))
            entries: dict[str, _Entry[T]] = {}
            for name, kv in fresh.items():
                current = self._entries.get(name)
                if current is not None and current.kv.mod_revision >= kv.mod_revision:
                    entries[name] = current
                    continue
                entries[name] = _Entry(kv)
                changes.append(CacheChange(name, kv, deleted=False))
            self._entries = entries
            self._revision = max(self._revision, result.revision)
            self._changed.notify_all()
        self._notify(changes)
        return result.revision

    def _apply(self, events: Sequence[WatchEvent]) -> None:
        changes: list[CacheChange] = []
        with self._changed:
            for event in events:
                self._apply_one(event.kv, event.kind == "delete", changes)
            self._revision = max(self._revision, events[-1].kv.mod_revision)
            self._changed.notify_all()
        self._notify(changes)

    def _apply_one(self, kv: KeyValue, deleted: bool, notify: list[CacheChange]) -> None:
        name = self._name(kv.key)
        with self._changed:
            current = self._entries.get(name)
            if current is not None and current.kv.mod_revision >= kv.mod_revision:
                return
            if deleted:
                if current is None:
                    return
                del self._entries[name]
            else:
                self._entries[name] = _Entry(kv)
            notify.append(CacheChange(name, kv, deleted))
            self._changed.notify_all()

    def _notify(self, changes: list[CacheChange]) -> None:
        if changes and self._on_change is not None:
            self._on_change(changes)

    def _name(self, key: str) -> str:
        return key[len(self.prefix) :]
