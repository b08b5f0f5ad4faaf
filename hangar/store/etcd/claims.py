"""The scheduler's claim protocol on etcd: one key per host, compare-and-set as a transaction.

A host's ``HostState`` (capacity, GPUs by BDF with their states, every machine's claim: CPUs,
memory, GPUs) is one value at ``{prefix}/claims/{host_id}``, and its ``VersionedHost.version`` is
the key's etcd ``version`` (each put adds one, so a successful compare-and-set takes it from
``expected`` to ``expected + 1`` as the protocol says). ``compare_and_set`` is one transaction:
``version == expected`` then put, else read the key back, so a loser learns the winner's state in
the same round trip and ``read_host`` hands it over without another one.
``compare_and_set_many`` nests one such transaction per host in a single transaction: etcd
commits them together in one raft entry, each winning or losing on its own compare.

``snapshot`` reads a ``PrefixCache`` fed by a watch (once ``start`` has run): no etcd round trip
per scheduler refresh, and it answers while etcd is unavailable. Writes go to etcd first and
reach the cache as this process's own writes at once.

A write whose answer was lost (member stopped mid-request) is retried by the client on another
member; if the first attempt had committed, the retry's compare fails and the value read back is
exactly the one written at ``expected + 1``: that counts as a win, so a placement is never
reported lost after it took effect.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Self

from hangar.scheduler.claims import ClaimWrite, VersionedHost
from hangar.scheduler.model import HostState
from hangar.store.etcd.cache import PrefixCache
from hangar.store.etcd.client import (
    MAX_TXN_OPS,
    Compare,
    Delete,
    EtcdClient,
    KeyValue,
    Put,
    PutResult,
    Range,
    RangeResult,
    Txn,
    TxnResult,
)
from hangar.store.etcd.keys import KeyLayout
from hangar.store.host_claims import host_state_from_json, host_state_to_json


def decode_host(kv: KeyValue) -> VersionedHost:
    return VersionedHost(host_state_from_json(kv.value.decode()), kv.version)


class EtcdClaimStore:
    """A ``BatchClaimStore`` on etcd. Thread-safe; ``start`` turns on the watch-fed snapshot."""

    def __init__(self, client: EtcdClient, layout: KeyLayout | None = None) -> None:
        self._client = client
        self._layout = layout or KeyLayout()
        self._cache: PrefixCache[VersionedHost] = PrefixCache(
            client, self._layout.claims, decode_host
        )
        self._started = False
        self._lock = threading.Lock()
        self._read_back: dict[str, VersionedHost] = {}
        self.lost_writes = 0
        """Compare-and-sets lost to another writer (a scheduler's conflicts)."""

    @property
    def cache(self) -> PrefixCache[VersionedHost]:
        return self._cache

    def start(self) -> Self:
        """Load every host and keep them current by a watch; ``snapshot`` then reads memory."""
        if not self._started:
            self._cache.start()
            self._started = True
        return self

    def close(self) -> None:
        self._cache.close()
        self._started = False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- registration ------------------------------------------------------------------------

    def put_host(self, host: HostState) -> VersionedHost:
        """Register or replace a host unconditionally (inventory), bumping its version."""
        key = self._layout.claim(host.id)
        value = host_state_to_json(host).encode()
        result = self._client.txn(Txn(success=(Put(key, value, prev_kv=True),)))
        put = result.responses[0]
        previous = put.prev if isinstance(put, PutResult) else None
        version = previous.version + 1 if previous is not None else 1
        created = previous.create_revision if previous is not None else result.revision
        record = VersionedHost(host, version)
        self._note(KeyValue(key, value, version, result.revision, created), record)
        return record

    def put_hosts(self, hosts: Sequence[HostState], *, batch: int = MAX_TXN_OPS) -> None:
        """Register many hosts, ``batch`` per transaction (a fleet's first load)."""
        for start in range(0, len(hosts), batch):
            chunk = hosts[start : start + batch]
            self._client.txn(
                Txn(
                    success=tuple(
                        Put(self._layout.claim(host.id), host_state_to_json(host).encode())
                        for host in chunk
                    )
                )
            )

    def remove_host(self, host_id: str, expected_version: int) -> bool:
        """Forget a host if it is still at ``expected_version`` (no claim slipped in)."""
        key = self._layout.claim(host_id)
        result = self._client.txn(
            Txn(compare=(Compare.version_is(key, expected_version),), success=(Delete(key),))
        )
        return result.succeeded

    # -- the ClaimStore protocol --------------------------------------------------------------

    def snapshot(self) -> Mapping[str, VersionedHost]:
        if self._started:
            return self._cache.snapshot()
        result = self._client.range_prefix(self._layout.claims)
        return {record.state.id: record for record in map(decode_host, result.kvs)}

    def read_host(self, host_id: str) -> VersionedHost | None:
        """The host as etcd has it now (after a lost race: as the losing write read it back)."""
        with self._lock:
            record = self._read_back.pop(host_id, None)
        if record is not None:
            return record
        kv = self._client.get(self._layout.claim(host_id))
        if kv is None:
            return None
        record = decode_host(kv)
        self._note(kv, record)
        return record

    def compare_and_set(self, host_id: str, expected_version: int, new_state: HostState) -> bool:
        return self.compare_and_set_many([(host_id, expected_version, new_state)])[0]

    def compare_and_set_many(self, writes: Sequence[ClaimWrite]) -> list[bool]:
        prepared: list[tuple[str, str, int, HostState, bytes]] = []
        for host_id, expected_version, new_state in writes:
            if new_state.id != host_id:
                raise ValueError(f"state of host {new_state.id} written under {host_id}")
            key = self._layout.claim(host_id)
            prepared.append(
                (host_id, key, expected_version, new_state, host_state_to_json(new_state).encode())
            )
        if len({key for _, key, _, _, _ in prepared}) != len(prepared):
            raise ValueError("one write per host in a batch")
        outcomes: list[bool] = []
        for start in range(0, len(prepared), MAX_TXN_OPS):
            outcomes.extend(self._write_chunk(prepared[start : start + MAX_TXN_OPS]))
        return outcomes

    def _write_chunk(self, chunk: list[tuple[str, str, int, HostState, bytes]]) -> list[bool]:
        live = [item for item in chunk if item[2] >= 1]  # no host is ever at version 0
        txns = [
            Txn(
                compare=(Compare.version_is(key, expected),),
                success=(Put(key, value),),
                failure=(Range(key),),
            )
            for _, key, expected, _, value in live
        ]
        results: list[TxnResult] = []
        if len(txns) == 1:
            results = [self._client.txn(txns[0])]
        elif txns:
            outer = self._client.txn(Txn(success=txns))
            results = [result for result in outer.responses if isinstance(result, TxnResult)]
            revision = outer.revision
            results = [TxnResult(r.succeeded, revision, r.responses) for r in results]
        by_key = {item[1]: result for item, result in zip(live, results, strict=True)}
        outcomes = []
        for host_id, key, expected, state, value in chunk:
            result = by_key.get(key)
            outcomes.append(
                result is not None and self._settle(host_id, key, expected, state, value, result)
            )
        return outcomes

    def _settle(
        self,
        host_id: str,
        key: str,
        expected: int,
        state: HostState,
        value: bytes,
        result: TxnResult,
    ) -> bool:
        if result.succeeded:
            won = VersionedHost(state, expected + 1)
            self._note(KeyValue(key, value, expected + 1, result.revision, 0), won)
            return True
        current = result.responses[0] if result.responses else None
        kv = current.kvs[0] if isinstance(current, RangeResult) and current.kvs else None
        if kv is not None and kv.version == expected + 1 and kv.value == value:
            return True  # an earlier attempt whose answer was lost had committed this write
        with self._lock:
            self.lost_writes += 1
        if kv is not None:
            winner = decode_host(kv)
            with self._lock:
                self._read_back[host_id] = winner
            self._note(kv, winner)
        return False

    def _note(self, kv: KeyValue, record: VersionedHost) -> None:
        if self._started:
            self._cache.note(kv, record)
