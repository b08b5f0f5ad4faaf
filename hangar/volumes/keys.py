"""Volume keys: one random passphrase per encrypted volume, stored wrapped by a host key.

The host key is 32 random bytes in a file of mode 0600, created on first use; a host key file
that others may read is refused. A volume's passphrase is wrapped with AES-256-GCM under the
host key, the volume id bound in as associated data (a wrapped key copied onto another
volume's name does not unwrap). Passphrases reach ``qemu-img`` and QEMU only as files of mode
0600 in a private folder, removed once read: never argv, logs, events or error messages.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hangar.errors import VolumeError
from hangar.volumes.layout import PARTIAL_SUFFIX, PRIVATE_DIR_MODE, VolumeLayout

HOST_KEY_BYTES = 32
PASSPHRASE_RANDOM_BYTES = 32
NONCE_BYTES = 12
WRAPPED_MAGIC = b"HVK1"
SECRET_FILE_MODE = 0o600


def _write_new_file(path: Path, data: bytes) -> bool:
    """Create ``path`` (mode 0600) holding ``data``, durably and whole; False if it exists."""
    staged = path.with_name(path.name + PARTIAL_SUFFIX)
    with contextlib.suppress(FileNotFoundError):
        staged.unlink()
    descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_FILE_MODE)
    try:
        with os.fdopen(descriptor, "wb") as staged_file:
            staged_file.write(data)
            staged_file.flush()
            os.fsync(staged_file.fileno())
        try:
            os.link(staged, path)
        except FileExistsError:
            return False
        _fsync_dir(path.parent)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class KeyStore:
    """Wrapped per-volume keys under ``layout.keys_dir``, wrapped by ``host_key_file``."""

    def __init__(self, layout: VolumeLayout, host_key_file: Path | None = None) -> None:
        self._layout = layout
        self.host_key_file = host_key_file or layout.default_host_key

    # the host key
    def _host_key(self) -> bytes:
        self.host_key_file.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        if not self.host_key_file.exists():
            _write_new_file(self.host_key_file, secrets.token_bytes(HOST_KEY_BYTES))
        info = self.host_key_file.stat()
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise VolumeError(
                f"the volume host key file {self.host_key_file} may be read by others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); make it 0600",
                retryable=False,
                path=str(self.host_key_file),
            )
        key = self.host_key_file.read_bytes()
        if len(key) != HOST_KEY_BYTES:
            raise VolumeError(
                f"the volume host key file {self.host_key_file} does not hold a "
                f"{HOST_KEY_BYTES}-byte key",
                retryable=False,
                path=str(self.host_key_file),
            )
        return key

    @staticmethod
    def _associated_data(volume_id: str) -> bytes:
        return f"hangar volume key {volume_id}".encode()

    # volume keys
    def exists(self, volume_id: str) -> bool:
        return self._layout.key(volume_id).exists()

    def create(self, volume_id: str) -> None:
        """Make the volume's key unless it has one (idempotent: an existing key is kept)."""
        path = self._layout.key(volume_id)
        if path.exists():
            return
        self._layout.ensure_dirs()
        passphrase = base64.b64encode(secrets.token_bytes(PASSPHRASE_RANDOM_BYTES))
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = AESGCM(self._host_key()).encrypt(
            nonce, passphrase, self._associated_data(volume_id)
        )
        _write_new_file(path, WRAPPED_MAGIC + nonce + sealed)

    def _passphrase(self, volume_id: str) -> bytes:
        path = self._layout.key(volume_id)
        try:
            wrapped = path.read_bytes()
        except FileNotFoundError:
            raise VolumeError(
                f"volume {volume_id} is encrypted but its key is missing",
                retryable=False,
                volume_id=volume_id,
            ) from None
        header = len(WRAPPED_MAGIC) + NONCE_BYTES
        if not wrapped.startswith(WRAPPED_MAGIC) or len(wrapped) <= header:
            raise VolumeError(
                f"the key file of volume {volume_id} is not a wrapped key",
                retryable=False,
                volume_id=volume_id,
            )
        nonce = wrapped[len(WRAPPED_MAGIC) : header]
        try:
            return AESGCM(self._host_key()).decrypt(
                nonce, wrapped[header:], self._associated_data(volume_id)
            )
        except InvalidTag:
            raise VolumeError(
                f"the key of volume {volume_id} does not unwrap with this host's key",
                retryable=False,
                volume_id=volume_id,
            ) from None

    def delete(self, volume_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._layout.key(volume_id).unlink()

    # handing a passphrase to QEMU
    def write_secret_file(self, volume_id: str, path: Path) -> Path:
        """Write the volume's passphrase to ``path`` (mode 0600, replaced if there); the caller
        removes it once QEMU has read it (the QEMU driver does, after launch)."""
        passphrase = self._passphrase(volume_id)
        path.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_FILE_MODE)
        with os.fdopen(descriptor, "wb") as secret:
            secret.write(passphrase)
        return path

    @contextlib.contextmanager
    def secret_file(self, volume_id: str) -> Iterator[Path]:
        """The passphrase in a 0600 file under the layout's private ``run`` folder, for the
        length of the ``with`` block."""
        self._layout.ensure_dirs()
        descriptor, name = tempfile.mkstemp(
            prefix=f"{volume_id}.", suffix=".secret", dir=self._layout.run_dir
        )
        path = Path(name)
        try:
            with os.fdopen(descriptor, "wb") as secret:
                secret.write(self._passphrase(volume_id))
            yield path
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
