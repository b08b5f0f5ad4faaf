"""The typed etcd client, its watch and the watch-fed cache, against a real 3-member cluster."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from hangar.errors import InvalidRequest, StoreRejected
from hangar.store.etcd.cache import CacheChange, PrefixCache
from hangar.store.etcd.client import (
    Compare,
    EtcdClient,
    KeyValue,
    Put,
    PutResult,
    Range,
    RangeResult,
    Txn,
    TxnResult,
    parse_endpoints,
    prefix_end,
)
from hangar.store.etcd.keys import KeyLayout
from hangar.store.etcd.local import LocalEtcdCluster
from hangar.store.etcd.watch import Watch, WatchEvent

WAIT_S = 10.0


class Collector:
    """Collects watch events; ``wait_for`` blocks (bounded) until ``count`` have come."""

    def __init__(self) -> None:
        self.events: list[WatchEvent] = []
        self._changed = threading.Condition()

    def __call__(self, events: Sequence[WatchEvent]) -> None:
        with self._changed:
            self.events.extend(events)
            self._changed.notify_all()

    def wait_for(self, count: int) -> list[WatchEvent]:
        with self._changed:
            self._changed.wait_for(lambda: len(self.events) >= count, WAIT_S)
            return list(self.events)


def test_endpoints_and_prefixes_are_checked() -> None:
    assert [e.url for e in parse_endpoints("http://127.0.0.1:1,http://[::1]:2")] == [
        "http://127.0.0.1:1",
        "http://[::1]:2",
    ]
    for bad in ("", "https://a:1", "127.0.0.1:2379", "http://a:1/v3"):
        with pytest.raises(InvalidRequest):
            parse_endpoints(bad)
    for bad in ("hangar", "/hangar/", "/", "/a//b", "/a b"):
        with pytest.raises(InvalidRequest):
            KeyLayout(bad)
    with pytest.raises(InvalidRequest):
        KeyLayout().claim("a/b")
    assert prefix_end("/a/") == "/a0"


def test_put_get_and_a_transaction_that_compares_versions(
    etcd_client: EtcdClient, etcd_layout: KeyLayout
) -> None:
    key = etcd_layout.prefix + "/k"
    assert etcd_client.get(key) is None
    first = etcd_client.put(key, b"one")
    kv = etcd_client.get(key)
    assert kv is not None and (kv.value, kv.version, kv.mod_revision) == (b"one", 1, first.revision)
    stale = etcd_client.txn(
        Txn(
            compare=(Compare.version_is(key, 2),),
            success=(Put(key, b"never"),),
            failure=(Range(key),),
        )
    )
    assert not stale.succeeded
    read_back = stale.responses[0]
    assert isinstance(read_back, RangeResult) and read_back.kvs[0].value == b"one"
    won = etcd_client.txn(
        Txn(compare=(Compare.version_is(key, 1),), success=(Put(key, b"two", prev_kv=True),))
    )
    assert won.succeeded and won.revision > first.revision
    put = won.responses[0]
    assert isinstance(put, PutResult) and put.prev is not None and put.prev.value == b"one"
    created = etcd_client.txn(Txn(compare=(Compare.absent(key),), success=(Put(key, b"three"),)))
    assert not created.succeeded, "the key exists"


def test_nested_transactions_win_or_lose_one_by_one(
    etcd_client: EtcdClient, etcd_layout: KeyLayout
) -> None:
    keys = [f"{etcd_layout.prefix}/n{i}" for i in range(3)]
    for key in keys:
        etcd_client.put(key, b"v1")
    inner = [
        Txn(
            compare=(Compare.version_is(key, 1 if i != 1 else 7),),
            success=(Put(key, b"v2"),),
            failure=(Range(key),),
        )
        for i, key in enumerate(keys)
    ]
    outer = etcd_client.txn(Txn(success=inner))
    assert outer.succeeded
    answers = [answer for answer in outer.responses if isinstance(answer, TxnResult)]
    assert [answer.succeeded for answer in answers] == [True, False, True]
    values = [etcd_client.get(key) for key in keys]
    assert [kv.value if kv else None for kv in values] == [b"v2", b"v1", b"v2"]
    with pytest.raises(StoreRejected):  # etcd refuses two writes of one key in a transaction
        etcd_client.txn(Txn(success=(Put(keys[0], b"a"), Put(keys[0], b"b"))))
    with pytest.raises(InvalidRequest):
        Txn(success=[Put(keys[0], b"x")] * 129).to_json()


def test_a_prefix_range_reads_every_page_at_one_revision(
    etcd_client: EtcdClient, etcd_layout: KeyLayout
) -> None:
    prefix = etcd_layout.prefix + "/many/"
    etcd_client.txn(Txn(success=tuple(Put(f"{prefix}{i:03d}", b"x") for i in range(25))))
    etcd_client.put(etcd_layout.prefix + "/many0", b"outside the prefix")
    result = etcd_client.range_prefix(prefix, page_size=7)
    assert [kv.key for kv in result.kvs] == [f"{prefix}{i:03d}" for i in range(25)]
    assert result.revision >= max(kv.mod_revision for kv in result.kvs)
    assert etcd_client.delete(prefix, prefix=True).deleted == 25
    assert etcd_client.range_prefix(prefix).kvs == ()


def test_leases_expire_keys_and_refresh(etcd_client: EtcdClient, etcd_layout: KeyLayout) -> None:
    lease = etcd_client.grant_lease(5)
    assert lease.ttl_s == 5
    key = etcd_layout.prefix + "/leased"
    etcd_client.put(key, b"x", lease=lease.id)
    kv = etcd_client.get(key)
    assert kv is not None and kv.lease == lease.id
    assert etcd_client.keep_alive(lease.id) == 5
    assert 0 < etcd_client.lease_ttl(lease.id) <= 5
    etcd_client.revoke_lease(lease.id)
    assert etcd_client.get(key) is None, "revoking a lease deletes its keys"
    assert etcd_client.lease_ttl(lease.id) == -1
    assert etcd_client.keep_alive(lease.id) == 0
    etcd_client.revoke_lease(lease.id)  # already gone: not an error


def test_a_watch_delivers_every_change_in_order(
    etcd_client: EtcdClient, etcd_layout: KeyLayout
) -> None:
    prefix = etcd_layout.prefix + "/w/"
    start = etcd_client.put(etcd_layout.prefix + "/before", b"x").revision
    collected = Collector()
    watch = Watch(
        etcd_client,
        prefix,
        start_revision=start + 1,
        on_events=collected,
        on_compacted=lambda oldest: pytest.fail("no compaction here"),
    )
    watch.start()
    try:
        etcd_client.put(prefix + "a", b"1")
        etcd_client.put(etcd_layout.prefix + "/elsewhere", b"not watched")
        etcd_client.put(prefix + "b", b"2")
        etcd_client.delete(prefix + "a")
        events = collected.wait_for(3)
    finally:
        watch.stop()
    assert [(e.kind, e.kv.key, e.kv.value) for e in events] == [
        ("put", prefix + "a", b"1"),
        ("put", prefix + "b", b"2"),
        ("delete", prefix + "a", b""),
    ]
    assert [e.kv.mod_revision for e in events] == sorted(e.kv.mod_revision for e in events)


def test_a_watch_resumes_on_another_member_without_losing_or_repeating_events(
    own_etcd_cluster: LocalEtcdCluster,
) -> None:
    client = EtcdClient(own_etcd_cluster.endpoints, timeout_s=5.0)
    start = client.put("/w/start", b"x").revision
    collected = Collector()
    watch = Watch(
        client,
        "/w/k",
        start_revision=start + 1,
        on_events=collected,
        on_compacted=lambda oldest: pytest.fail("no compaction here"),
    )
    watch.start()
    try:
        for n in range(5):
            client.put(f"/w/k{n}", b"before")
        collected.wait_for(5)
        own_etcd_cluster.stop_member(0)  # the member the watch streams from
        for n in range(5, 10):
            client.put(f"/w/k{n}", b"after")
        events = collected.wait_for(10)
        assert watch.reconnects >= 1
    finally:
        watch.stop()
        client.close()
    assert [e.kv.key for e in events] == [f"/w/k{n}" for n in range(10)]


def test_a_watch_from_a_compacted_revision_asks_for_a_reload(
    etcd_client: EtcdClient, etcd_layout: KeyLayout
) -> None:
    key = etcd_layout.prefix + "/c"
    first = etcd_client.put(key, b"1").revision
    latest = etcd_client.put(key, b"2").revision
    etcd_client.call("/v3/kv/compaction", {"revision": str(latest)}, mutating=True)
    asked: list[int] = []
    reloaded = threading.Event()

    def reload(oldest: int) -> int:
        asked.append(oldest)
        reloaded.set()
        return latest + 1

    collected = Collector()
    watch = Watch(
        etcd_client,
        key,
        prefix=False,
        start_revision=first,
        on_events=collected,
        on_compacted=reload,
    )
    watch.start()
    try:
        assert reloaded.wait(WAIT_S)
        etcd_client.put(key, b"3")
        events = collected.wait_for(1)
    finally:
        watch.stop()
    assert asked == [latest]
    assert [e.kv.value for e in events] == [b"3"]


def test_the_cache_loads_then_follows_and_keeps_its_own_newer_writes(
    etcd_client: EtcdClient, etcd_layout: KeyLayout
) -> None:
    prefix = etcd_layout.prefix + "/cache/"
    for name in ("a", "b"):
        etcd_client.put(prefix + name, name.encode())
    changes: list[CacheChange] = []
    cache: PrefixCache[bytes] = PrefixCache(
        etcd_client, prefix, lambda kv: kv.value.upper(), on_change=changes.extend, page_size=1
    )
    cache.start()
    try:
        assert cache.snapshot() == {"a": b"A", "b": b"B"}
        etcd_client.delete(prefix + "a")
        revision = etcd_client.put(prefix + "c", b"c").revision
        assert cache.wait_revision(revision, WAIT_S)
        assert cache.snapshot() == {"b": b"B", "c": b"C"}
        assert cache.connected
        later = etcd_client.put(prefix + "b", b"new")
        cache.note(KeyValue(prefix + "b", b"new", 2, later.revision, 0))
        assert cache.get("b") == b"NEW", "a writer reads its own write at once"
        assert cache.wait_revision(later.revision, WAIT_S)
        cache.note(KeyValue(prefix + "b", b"old", 1, later.revision - 5, 0))
        assert cache.get("b") == b"NEW", "an older value never replaces a newer one"
    finally:
        cache.close()
    assert [(c.name, c.deleted) for c in changes][:4] == [
        ("a", False),
        ("b", False),
        ("a", True),
        ("c", False),
    ]
