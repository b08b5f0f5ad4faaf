"""Secrets sealed at rest in a real etcd: they round-trip, and what etcd holds (read with an
independent client, etcd3gw) never contains the plaintext."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from etcd3gw.client import Etcd3Client

from hangar.errors import InvalidRequest, SealedValueError
from hangar.store.etcd.client import EtcdClient
from hangar.store.etcd.keys import KeyLayout
from hangar.store.etcd.local import LocalEtcdCluster
from hangar.store.etcd.sealed import SealedValues, Sealer

SECRET = b"volume-key: 9f3c1d8e2b7a4c6f-not-in-clear"


@pytest.fixture
def sealer(tmp_path: Path) -> Sealer:
    return Sealer.from_key_files([Sealer.create_key_file(tmp_path / "sealing.key")])


def raw_value(cluster: LocalEtcdCluster, key: str) -> bytes:
    """The stored bytes, read by etcd3gw (not by hangar's client)."""
    url = urlsplit(cluster.endpoints[0])
    reader = Etcd3Client(host=url.hostname or "", port=url.port or 2379, timeout=5)
    values = reader.get(key)
    assert len(values) == 1
    return values[0]


def test_a_sealed_value_round_trips_and_etcd_holds_no_plaintext(
    etcd_cluster: LocalEtcdCluster, etcd_client: EtcdClient, etcd_layout: KeyLayout, sealer: Sealer
) -> None:
    values = SealedValues(etcd_client, sealer, etcd_layout)
    values.put("volume-keys", "vol_1", SECRET)
    assert values.get("volume-keys", "vol_1") == SECRET
    stored = raw_value(etcd_cluster, values.key("volume-keys", "vol_1"))
    assert SECRET not in stored and b"9f3c1d8e" not in stored
    assert stored.startswith(b"hgs1") and len(stored) >= len(SECRET) + 32
    values.put("volume-keys", "vol_1", SECRET)
    assert raw_value(etcd_cluster, values.key("volume-keys", "vol_1")) != stored, "fresh nonce"
    assert values.names("volume-keys") == ["vol_1"]
    assert values.get("volume-keys", "vol_2") is None
    assert values.delete("volume-keys", "vol_1")
    assert values.get("volume-keys", "vol_1") is None


def test_a_value_moved_altered_or_sealed_under_another_key_does_not_open(
    etcd_client: EtcdClient, etcd_layout: KeyLayout, sealer: Sealer, tmp_path: Path
) -> None:
    values = SealedValues(etcd_client, sealer, etcd_layout)
    values.put("app-secrets", "a", SECRET)
    sealed = etcd_client.get(values.key("app-secrets", "a"))
    assert sealed is not None
    etcd_client.put(values.key("app-secrets", "b"), sealed.value)  # copied under another key
    with pytest.raises(SealedValueError):
        values.get("app-secrets", "b")
    altered = bytearray(sealed.value)
    altered[-1] ^= 1
    etcd_client.put(values.key("app-secrets", "a"), bytes(altered))
    with pytest.raises(SealedValueError):
        values.get("app-secrets", "a")
    etcd_client.put(values.key("app-secrets", "a"), b"plain text")
    with pytest.raises(SealedValueError):
        values.get("app-secrets", "a")
    other = Sealer.from_key_files([Sealer.create_key_file(tmp_path / "other.key")])
    with pytest.raises(SealedValueError) as raised:
        other.open(sealer.seal(SECRET, "k"), "k")
    assert not raised.value.retryable


def test_keys_rotate_and_lookup_names_hide_what_they_name(tmp_path: Path) -> None:
    old = Sealer.create_key_file(tmp_path / "old.key")
    new = Sealer.create_key_file(tmp_path / "new.key")
    before = Sealer.from_key_files([old]).seal(SECRET, "k")
    rotating = Sealer.from_key_files([new, old])
    assert rotating.open(before, "k") == SECRET
    assert Sealer.from_key_files([new]).open(rotating.seal(SECRET, "k"), "k") == SECRET
    token_hash = b"5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
    name = rotating.lookup_name(token_hash, "token")
    assert name == rotating.lookup_name(token_hash, "token")
    assert name != rotating.lookup_name(token_hash, "volume")
    assert name != Sealer.from_key_files([old]).lookup_name(token_hash, "token")
    assert token_hash.decode() not in name and len(name) == 64


def test_key_files_must_be_private_and_whole(tmp_path: Path) -> None:
    path = Sealer.create_key_file(tmp_path / "k")
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        Sealer.create_key_file(path)
    os.chmod(path, 0o640)
    with pytest.raises(InvalidRequest) as raised:
        Sealer.from_key_files([path])
    assert raised.value.fields["field"] == "key_file" and "chmod 600" in raised.value.message
    short = tmp_path / "short"
    short.write_bytes(b"too short")
    short.chmod(0o600)
    with pytest.raises(InvalidRequest):
        Sealer.from_key_files([short])
    with pytest.raises(InvalidRequest):
        Sealer.from_key_files([tmp_path / "missing"])
    with pytest.raises(InvalidRequest):
        Sealer([])
