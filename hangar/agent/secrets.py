"""What a boot gets of its app's secrets: every secret as an environment variable (unless the
machine has ``skip_secrets``), and the decoded content of each one a ``files[].secret_name``
names (Fly keeps a file's content in a secret base64-encoded). Errors name the secret, never
its value."""

from __future__ import annotations

import base64
import binascii

from hangar.agent.platform import BootSecrets
from hangar.errors import GuestBootError
from hangar.model.machine import Machine
from hangar.store.protocol import SecretStore


def boot_secrets(store: SecretStore, machine: Machine) -> BootSecrets:
    file_names = sorted({f.secret_name for f in machine.config.files if f.secret_name})
    if machine.skip_secrets:
        values = store.open_secrets(machine.app, file_names) if file_names else {}
        env: dict[str, str] = {}
    else:
        values = store.open_secrets(machine.app)
        env = {name: _text(name, value) for name, value in values.items()}
    files = {}
    for name in file_names:
        if name not in values:
            raise GuestBootError(
                f"config.files: app {machine.app} has no secret named {name}",
                field="config.files.secret_name",
                secret=name,
            )
        try:
            files[name] = base64.b64decode(values[name], validate=True)
        except (binascii.Error, ValueError):
            raise GuestBootError(
                f"config.files: secret {name} is not base64 (a file's secret holds its "
                "content base64-encoded)",
                field="config.files.secret_name",
                secret=name,
            ) from None
    return BootSecrets(env=env, files=files)


def _text(name: str, value: bytes) -> str:
    try:
        text = value.decode()
    except UnicodeDecodeError:
        raise GuestBootError(
            f"secret {name} is not UTF-8 text and cannot be an environment variable",
            secret=name,
        ) from None
    if "\0" in text:
        raise GuestBootError(f"secret {name} contains NUL", secret=name)
    return text
