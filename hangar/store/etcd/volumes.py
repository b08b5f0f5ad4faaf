"""The fleet's VolumeStore on etcd: every app's volume records, each naming its host.

One key a volume, ``volumes/{volume_id}``, holding the record with its ``version``. A
compare-and-set reads the key, checks the record's version, and writes the next one in a
transaction comparing the ``mod_revision`` it read, so of two agents or replicas racing on one
volume exactly one wins (the attach/detach logic built on it is ``hangar.store.volume_claims``).
"""

from __future__ import annotations

from hangar.errors import Conflict
from hangar.model.volume import Volume, VolumeState
from hangar.store.etcd.client import MAX_TXN_OPS, Compare, Delete, EtcdClient, Put, Txn
from hangar.store.etcd.keys import KeyLayout


class EtcdVolumeStore:
    def __init__(self, client: EtcdClient, layout: KeyLayout | None = None) -> None:
        self._client = client
        self._layout = layout or KeyLayout()

    def _key(self, volume_id: str) -> str:
        return self._layout.record("volumes", volume_id)

    def insert_volume(self, volume: Volume) -> None:
        key = self._key(volume.id)
        result = self._client.txn(
            Txn(
                compare=(Compare.absent(key),),
                success=(Put(key, volume.model_dump_json().encode()),),
            )
        )
        if not result.succeeded:
            raise Conflict(f"volume {volume.id} already exists", volume_id=volume.id)

    def get_volume(self, volume_id: str) -> Volume | None:
        kv = self._client.get(self._key(volume_id))
        return None if kv is None else Volume.model_validate_json(kv.value)

    def list_volumes(
        self,
        app: str | None = None,
        *,
        host_id: str | None = None,
        include_destroyed: bool = False,
    ) -> list[Volume]:
        kvs = self._client.range_prefix(self._layout.records("volumes")).kvs
        found = [(Volume.model_validate_json(kv.value), kv.create_revision) for kv in kvs]
        found.sort(key=lambda pair: (pair[0].created_at, pair[1]))
        return [
            volume
            for volume, _ in found
            if (app is None or volume.app == app)
            and (host_id is None or volume.host_id == host_id)
            and (include_destroyed or volume.state is not VolumeState.DESTROYED)
        ]

    def forget_volumes(self, app: str) -> list[str]:
        """Delete the records of ``app``'s destroyed volumes; their ids."""
        gone = [
            volume
            for volume in self.list_volumes(app, include_destroyed=True)
            if volume.state is VolumeState.DESTROYED
        ]
        for start in range(0, len(gone), MAX_TXN_OPS):
            page = gone[start : start + MAX_TXN_OPS]
            self._client.txn(Txn(success=tuple(Delete(self._key(v.id)) for v in page)))
        return [volume.id for volume in gone]

    def compare_and_set_volume(self, volume: Volume) -> bool:
        key = self._key(volume.id)
        kv = self._client.get(key)
        if kv is None or Volume.model_validate_json(kv.value).version != volume.version:
            return False
        stored = volume.model_copy(update={"version": volume.version + 1})
        result = self._client.txn(
            Txn(
                compare=(Compare.mod_revision_is(key, kv.mod_revision),),
                success=(Put(key, stored.model_dump_json().encode()),),
            )
        )
        return result.succeeded
