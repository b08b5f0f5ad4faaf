"""The SecretStore contract, over the embedded store (SQLite) and the fleet's (etcd): values
round-trip sealed, each change moves the app's version on by one, bounds hold, and what etcd
holds never shows a value in clear."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from hangar.errors import NotFound, Unprocessable
from hangar.store.etcd.secrets import MAX_VALUES_PER_UPDATE, EtcdSecretStore
from hangar.store.protocol import SecretStore
from hangar.store.secrets import MAX_SECRET_BYTES, MAX_SECRETS_PER_APP, SqliteSecretStore
from tests.fixtures.etcd import StoreScratch

SECRET_BACKENDS: dict[str, Callable[[StoreScratch], SecretStore]] = {
    "sqlite": lambda scratch: SqliteSecretStore(scratch.tmp / "db", scratch.tmp / "key"),
    "etcd": lambda scratch: EtcdSecretStore(scratch.etcd_client(), scratch.sealer, scratch.layout),
}
VALUE = b"db-password-7f3a9c-not-in-clear"


@pytest.fixture(params=sorted(SECRET_BACKENDS))
def secrets(request: pytest.FixtureRequest, store_scratch: StoreScratch) -> SecretStore:
    return SECRET_BACKENDS[request.param](store_scratch)


def test_values_round_trip_and_versions_move_on(secrets: SecretStore) -> None:
    assert secrets.secrets_version("web") == 0
    assert secrets.list_secrets("web") == []
    assert secrets.update_secrets("web", {"DB": VALUE, "KEY": b"k1"}, 1.0) == 1
    assert secrets.open_secrets("web") == {"DB": VALUE, "KEY": b"k1"}
    assert secrets.open_secrets("web", ["KEY"]) == {"KEY": b"k1"}
    [db, key] = secrets.list_secrets("web")
    assert (db.name, key.name) == ("DB", "KEY")
    assert VALUE.decode() not in db.digest

    assert secrets.update_secrets("web", {"KEY": b"k2", "DB": None}, 2.0) == 2
    [changed] = secrets.list_secrets("web")
    assert changed.name == "KEY" and changed.digest != key.digest
    assert (changed.created_at, changed.updated_at) == (1.0, 2.0)
    assert secrets.open_secrets("web") == {"KEY": b"k2"}
    assert secrets.open_secrets("api") == {}, "apps do not see each other's"
    with pytest.raises(NotFound) as missing:
        secrets.open_secrets("web", ["DB"])
    assert missing.value.fields["field"] == "secret_name"

    secrets.delete_app_secrets("web")
    assert secrets.secrets_version("web") == 0
    assert secrets.open_secrets("web") == {}


def test_bounds(secrets: SecretStore) -> None:
    with pytest.raises(Unprocessable):
        secrets.update_secrets("web", {"BIG": b"x" * (MAX_SECRET_BYTES + 1)}, 1.0)
    per_update = min(MAX_VALUES_PER_UPDATE, MAX_SECRETS_PER_APP)
    names = [f"S{i}" for i in range(MAX_SECRETS_PER_APP)]
    for start in range(0, len(names), per_update):
        secrets.update_secrets("web", {n: b"v" for n in names[start : start + per_update]}, 1.0)
    with pytest.raises(Unprocessable):
        secrets.update_secrets("web", {"ONE_MORE": b"v"}, 2.0)
    kept = secrets.list_secrets("web")
    assert len(kept) == MAX_SECRETS_PER_APP, "a refused update changes nothing"


def test_etcd_holds_no_value_in_clear(store_scratch: StoreScratch) -> None:
    client = store_scratch.etcd_client()
    store = EtcdSecretStore(client, store_scratch.sealer, store_scratch.layout)
    store.update_secrets("web", {"DB": VALUE}, 1.0)
    stored = b"".join(
        kv.key.encode() + kv.value for kv in client.range_prefix(store_scratch.layout.prefix).kvs
    )
    assert VALUE not in stored and b"7f3a9c" not in stored
    # A second replica with the fleet's key reads it.
    other = EtcdSecretStore(client, store_scratch.sealer, store_scratch.layout)
    assert other.open_secrets("web") == {"DB": VALUE}
