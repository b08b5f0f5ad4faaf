"""Secrets at rest in etcd: volume keys, app secrets and token hashes are stored sealed.

``Sealer`` encrypts with AES-256-GCM (``cryptography``) under a key read from a file only its
owner may read (mode 0600 or stricter; anything else is refused). Each value gets a fresh random
96-bit nonce and is bound to where it is stored: the etcd key is the associated data, so a
sealed value copied under another key does not open. A sealed value is::

    b"hgs1" | key id (4 bytes) | nonce (12 bytes) | ciphertext and tag

The key id names the master key that sealed it, so a ``Sealer`` given the new key first and
old keys after opens values sealed under any of them while it rotates.

Values found by content (a token is looked up by its hash) cannot be found by their sealed form,
which differs on every write: ``lookup_name`` gives a keyed digest (HMAC-SHA256 under a key
derived from the master key) to use as the etcd key instead, so etcd never holds the hash itself.

``SealedValues`` stores sealed values under ``{prefix}/sealed/{kind}/{name}``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hangar.errors import InvalidRequest, SealedValueError
from hangar.store.etcd.client import EtcdClient
from hangar.store.etcd.keys import KeyLayout

MAGIC = b"hgs1"
KEY_BYTES = 32
KEY_ID_BYTES = 4
NONCE_BYTES = 12
HEADER_BYTES = len(MAGIC) + KEY_ID_BYTES + NONCE_BYTES
MAX_PLAINTEXT_BYTES = 64 * 1024
"""A secret is small: a key, a token hash, an app secret (Fly caps secrets far lower)."""


def _derive(master: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=purpose).derive(master)


class _Key:
    __slots__ = ("_master", "aead", "id", "index")

    def __init__(self, master: bytes) -> None:
        if len(master) != KEY_BYTES:
            raise InvalidRequest(f"a sealing key is {KEY_BYTES} bytes", field="key")
        self._master = master
        self.id = hashlib.sha256(b"hangar sealing key id\0" + master).digest()[:KEY_ID_BYTES]
        self.aead = AESGCM(_derive(master, b"hangar sealed values v1"))
        self.index = _derive(master, b"hangar lookup names v1")

    def derive(self, purpose: str) -> bytes:
        return _derive(self._master, f"hangar {purpose} v1".encode())


class Sealer:
    def __init__(self, keys: Sequence[bytes]) -> None:
        """``keys[0]`` seals; every key opens what it sealed."""
        if not keys:
            raise InvalidRequest("a sealer needs a key", field="key")
        self._keys = [_Key(key) for key in keys]
        self._by_id = {key.id: key for key in self._keys}

    @staticmethod
    def create_key_file(path: Path) -> Path:
        """Write a new random key to ``path`` (created 0600; an existing file is never
        overwritten)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(secrets.token_bytes(KEY_BYTES))
        return path

    @staticmethod
    def read_key_file(path: Path) -> bytes:
        """The key in ``path``, refused unless only its owner can read it."""
        try:
            info = path.stat()
        except FileNotFoundError:
            raise InvalidRequest(
                f"sealing key file {path} does not exist", field="key_file"
            ) from None
        if not stat.S_ISREG(info.st_mode):
            raise InvalidRequest(f"sealing key file {path} is not a file", field="key_file")
        if info.st_mode & 0o077:
            raise InvalidRequest(
                f"sealing key file {path} is readable by others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); chmod 600 it",
                field="key_file",
            )
        key = path.read_bytes()
        if len(key) != KEY_BYTES:
            raise InvalidRequest(
                f"sealing key file {path} holds {len(key)} bytes, not {KEY_BYTES}",
                field="key_file",
            )
        return key

    @classmethod
    def from_key_files(cls, paths: Sequence[Path]) -> Sealer:
        """The first file's key seals; the others (older keys) still open."""
        return cls([cls.read_key_file(path) for path in paths])

    def seal(self, plaintext: bytes, context: str) -> bytes:
        if len(plaintext) > MAX_PLAINTEXT_BYTES:
            raise InvalidRequest(
                f"a sealed value holds at most {MAX_PLAINTEXT_BYTES} bytes", field="value"
            )
        key = self._keys[0]
        nonce = secrets.token_bytes(NONCE_BYTES)
        return MAGIC + key.id + nonce + key.aead.encrypt(nonce, plaintext, context.encode())

    def open(self, sealed: bytes, context: str) -> bytes:
        if len(sealed) < HEADER_BYTES + 16 or not sealed.startswith(MAGIC):
            raise SealedValueError(f"{context}: not a sealed value", context=context)
        key_id = sealed[len(MAGIC) : len(MAGIC) + KEY_ID_BYTES]
        key = self._by_id.get(key_id)
        if key is None:
            raise SealedValueError(
                f"{context}: sealed under a key this sealer does not hold",
                context=context,
                key_id=key_id.hex(),
            )
        nonce = sealed[len(MAGIC) + KEY_ID_BYTES : HEADER_BYTES]
        try:
            return key.aead.decrypt(nonce, sealed[HEADER_BYTES:], context.encode())
        except InvalidTag:
            raise SealedValueError(
                f"{context}: sealed value altered or stored under another key", context=context
            ) from None

    def derived_keys(self, purpose: str) -> list[bytes]:
        """A key for ``purpose`` derived from each master key, the sealing key's first: what
        holders of the fleet's key share without ever sending it (``hangar.fleet.relay``)."""
        return [key.derive(purpose) for key in self._keys]

    def lookup_name(self, data: bytes, purpose: str) -> str:
        """A keyed digest of ``data`` (hex), stable for one master key: a name to find a
        sealed value by its content without storing the content in clear."""
        return hmac.new(self._keys[0].index, purpose.encode() + b"\0" + data, "sha256").hexdigest()


def open_hash_index(
    client: EtcdClient, sealer: Sealer, key: str, secret_hash: str
) -> dict[str, Any] | None:
    """The sealed index record at ``key`` (found by a keyed digest of ``secret_hash``) if it
    holds that very hash; None when it is absent or holds another's (a digest collision)."""
    kv = client.get(key)
    if kv is None:
        return None
    opened: dict[str, Any] = json.loads(sealer.open(kv.value, key))
    return opened if opened.get("hash") == secret_hash else None


class SealedValues:
    """Sealed values in etcd, one key each; ``get`` opens, and refuses anything altered."""

    def __init__(self, client: EtcdClient, sealer: Sealer, layout: KeyLayout | None = None) -> None:
        self._client = client
        self._sealer = sealer
        self._layout = layout or KeyLayout()

    def key(self, kind: str, name: str) -> str:
        return self._layout.sealed(kind, name)

    def put(self, kind: str, name: str, plaintext: bytes) -> int:
        """Store (or replace) a value; the revision it was written at."""
        key = self.key(kind, name)
        return self._client.put(key, self._sealer.seal(plaintext, key)).revision

    def get(self, kind: str, name: str) -> bytes | None:
        key = self.key(kind, name)
        kv = self._client.get(key)
        return None if kv is None else self._sealer.open(kv.value, key)

    def delete(self, kind: str, name: str) -> bool:
        return self._client.delete(self.key(kind, name)).deleted > 0

    def names(self, kind: str) -> list[str]:
        prefix = self._layout.sealed_kind(kind)
        return [kv.key[len(prefix) :] for kv in self._client.range_prefix(prefix).kvs]
