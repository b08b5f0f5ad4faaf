"""The fleet's SecretStore: apps' secrets in etcd, each value sealed, never in clear.

Per app, two kinds of keys, changed together in one transaction:

- ``{prefix}/app-secrets/{app}``: the app's index in clear JSON, what ``list_secrets`` shows
  (names, keyed digests, sizes, times) and the app's secrets version. Every update compares
  its mod revision, so two replicas updating one app at once never lose a change.
- ``{prefix}/sealed/app-secret/{app}.{name}``: each value, sealed by the fleet's
  :class:`Sealer` and bound to that key (a value copied under another key does not open).

The bounds are the embedded store's (:mod:`hangar.store.secrets`): values per app, bytes per
value and per app; one update also fits one etcd transaction.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

from hangar.errors import Conflict, NotFound, Unprocessable
from hangar.store.etcd.client import MAX_TXN_OPS, Compare, Delete, EtcdClient, Put, Txn
from hangar.store.etcd.keys import KeyLayout, check_name
from hangar.store.etcd.sealed import Sealer
from hangar.store.protocol import SecretRecord
from hangar.store.secrets import (
    DIGEST_CHARS,
    MAX_APP_SECRET_BYTES,
    MAX_SECRET_BYTES,
    MAX_SECRETS_PER_APP,
)

INDEX_KIND = "app-secrets"
SEALED_KIND = "app-secret"
UPDATE_ATTEMPTS = 8
MAX_VALUES_PER_UPDATE = MAX_TXN_OPS - 2
"""The index's compare and put take two operations of the transaction."""


class EtcdSecretStore:
    def __init__(self, client: EtcdClient, sealer: Sealer, layout: KeyLayout | None = None) -> None:
        self._client = client
        self._sealer = sealer
        self._layout = layout or KeyLayout()

    def _index_key(self, app: str) -> str:
        return self._layout.record(INDEX_KIND, app)

    def _value_key(self, app: str, name: str) -> str:
        return self._layout.sealed(SEALED_KIND, f"{check_name(app, 'app')}.{name}")

    def _index(self, app: str) -> tuple[dict[str, Any], int]:
        """The app's index and its mod revision (0: none yet)."""
        kv = self._client.get(self._index_key(app))
        if kv is None:
            return {"version": 0, "secrets": {}}, 0
        return json.loads(kv.value), kv.mod_revision

    def update_secrets(self, app: str, values: Mapping[str, bytes | None], now: float) -> int:
        if len(values) > MAX_VALUES_PER_UPDATE:
            raise Unprocessable(
                f"one update sets or removes at most {MAX_VALUES_PER_UPDATE} secrets",
                field="values",
            )
        for name, value in values.items():
            check_name(name, "name")
            if value is not None and len(value) > MAX_SECRET_BYTES:
                raise Unprocessable(
                    f"secret {name}: a value holds at most {MAX_SECRET_BYTES} bytes",
                    field="value",
                    secret=name,
                )
        for _ in range(UPDATE_ATTEMPTS):
            index, revision = self._index(app)
            entries: dict[str, dict[str, Any]] = index["secrets"]
            ops: list[Put | Delete] = []
            for name, value in values.items():
                key = self._value_key(app, name)
                if value is None:
                    entries.pop(name, None)
                    ops.append(Delete(key))
                    continue
                digest = self._sealer.lookup_name(value, f"secret digest {app}/{name}")
                created = entries.get(name, {}).get("created_at", now)
                entries[name] = {
                    "digest": digest[:DIGEST_CHARS],
                    "size": len(value),
                    "created_at": created,
                    "updated_at": now,
                }
                ops.append(Put(key, self._sealer.seal(value, key)))
            _check_bounds(entries)
            index["version"] += 1
            index_key = self._index_key(app)
            guard = (
                Compare.mod_revision_is(index_key, revision)
                if revision
                else Compare.absent(index_key)
            )
            put_index = Put(index_key, json.dumps(index, sort_keys=True).encode())
            if self._client.txn(Txn(compare=(guard,), success=(put_index, *ops))).succeeded:
                return int(index["version"])
        raise Conflict(
            f"app {app}'s secrets changed under {UPDATE_ATTEMPTS} updates in a row; try again",
            field="values",
        )

    def list_secrets(self, app: str) -> list[SecretRecord]:
        index, _ = self._index(app)
        return [
            SecretRecord(
                name=name,
                digest=entry["digest"],
                created_at=entry["created_at"],
                updated_at=entry["updated_at"],
            )
            for name, entry in sorted(index["secrets"].items())
        ]

    def secrets_version(self, app: str) -> int:
        return int(self._index(app)[0]["version"])

    def open_secrets(self, app: str, names: Collection[str] | None = None) -> dict[str, bytes]:
        prefix = self._value_key(app, "")
        found = {kv.key[len(prefix) :]: kv for kv in self._client.range_prefix(prefix).kvs}
        if names is not None:
            missing = sorted(set(names) - set(found))
            if missing:
                raise NotFound(
                    f"app {app} has no secret named {', '.join(missing)}", field="secret_name"
                )
            found = {name: found[name] for name in names}
        return {name: self._sealer.open(kv.value, kv.key) for name, kv in found.items()}

    def delete_app_secrets(self, app: str) -> None:
        self._client.txn(
            Txn(
                success=(
                    Delete(self._index_key(app)),
                    Delete(self._value_key(app, ""), prefix=True),
                )
            )
        )


def _check_bounds(entries: Mapping[str, Mapping[str, Any]]) -> None:
    if len(entries) > MAX_SECRETS_PER_APP:
        raise Unprocessable(f"an app holds at most {MAX_SECRETS_PER_APP} secrets", field="values")
    if sum(int(entry["size"]) for entry in entries.values()) > MAX_APP_SECRET_BYTES:
        raise Unprocessable(
            f"an app's secrets hold at most {MAX_APP_SECRET_BYTES} bytes together",
            field="values",
        )
