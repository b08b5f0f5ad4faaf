"""Hosts an operator took out of placement: ``{prefix}/cordons/{host_id}`` holds who cordoned
it, when, and whether it is being drained. Every API replica keeps the cordons in a watch-fed
``PrefixCache``, so the placer asks memory; a cordon takes effect on every replica as soon as
its watch delivers it (and on the replica that wrote it at once)."""

from __future__ import annotations

from pydantic import BaseModel

from hangar.store.etcd.cache import PrefixCache
from hangar.store.etcd.client import EtcdClient, KeyValue
from hangar.store.etcd.keys import KeyLayout

CORDONS = "cordons"
WATCH_CATCH_UP_S = 5.0


class Cordon(BaseModel):
    host_id: str
    by: str
    at: float
    draining: bool = False


def decode_cordon(kv: KeyValue) -> Cordon:
    return Cordon.model_validate_json(kv.value)


class Cordons:
    def __init__(self, client: EtcdClient, layout: KeyLayout | None = None) -> None:
        self._client = client
        self._layout = layout or KeyLayout()
        self._cache: PrefixCache[Cordon] = PrefixCache(
            client, self._layout.records(CORDONS), decode_cordon
        )
        self._started = False

    def start(self) -> None:
        self._cache.start()
        self._started = True

    def close(self) -> None:
        self._cache.close()

    def cordon(self, cordon: Cordon) -> Cordon:
        key = self._layout.record(CORDONS, cordon.host_id)
        self._client.put(key, cordon.model_dump_json().encode())
        kv = self._client.get(key)
        if kv is not None and self._started:
            self._cache.note(kv, cordon)
        return cordon

    def uncordon(self, host_id: str) -> bool:
        result = self._client.delete(self._layout.record(CORDONS, host_id))
        if self._started:  # this replica places there again as soon as this returns
            self._cache.wait_revision(result.revision, WATCH_CATCH_UP_S)
        return result.deleted > 0

    def get(self, host_id: str) -> Cordon | None:
        if self._started:
            return self._cache.get(host_id)
        kv = self._client.get(self._layout.record(CORDONS, host_id))
        return None if kv is None else decode_cordon(kv)

    def is_cordoned(self, host_id: str) -> bool:
        return self.get(host_id) is not None
