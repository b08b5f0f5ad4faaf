"""App secrets, as Fly's current API has them (``/v1/apps/{app}/secrets``): set, list, unset.

A value goes in and never comes out through the API: lists show each secret's name and a
digest of its value. Values are sealed at rest (the store's key file), and are never logged,
put in events, audit records or error messages: an error names the secret, not its value.
Machines get them at boot (``hangar.agent.secrets``).
"""

from __future__ import annotations

from collections.abc import Mapping

from hangar.api.schemas import (
    SecretList,
    SecretSet,
    SecretsUpdated,
    SecretsVersion,
    SecretView,
    iso8601,
)
from hangar.clock import Clock
from hangar.errors import NotFound, PreconditionFailed, Unprocessable, UnsupportedField
from hangar.model.config import SECRET_NAME_PATTERN
from hangar.store.protocol import SecretRecord, SecretStore


def secret_view(record: SecretRecord) -> SecretView:
    return SecretView(
        name=record.name,
        digest=record.digest,
        created_at=iso8601(record.created_at),
        updated_at=iso8601(record.updated_at),
    )


class SecretService:
    def __init__(self, store: SecretStore, clock: Clock) -> None:
        self._store = store
        self._clock = clock

    def _check_version(self, app: str, version: int | None) -> None:
        """``?version=N``: the app's secrets must have reached version N (a client reads its
        own write); there is no older state to show."""
        current = self._store.secrets_version(app)
        if version is not None and version > current:
            raise PreconditionFailed(
                f"version: app {app}'s secrets are at version {current}, not yet {version}",
                field="version",
            )

    def list(self, app: str, version: int | None, show_secrets: bool) -> SecretList:
        _no_values(show_secrets)
        self._check_version(app, version)
        return SecretList(secrets=[secret_view(r) for r in self._store.list_secrets(app)])

    def get(self, app: str, name: str, version: int | None, show_secrets: bool) -> SecretView:
        _no_values(show_secrets)
        self._check_version(app, version)
        record = next((r for r in self._store.list_secrets(app) if r.name == name), None)
        if record is None:
            raise NotFound(f"app {app} has no secret named {name}", field="name")
        return secret_view(record)

    def set(self, app: str, name: str, value: str) -> SecretSet:
        version = self._store.update_secrets(
            app, {_name(name, "name"): _value(name, value)}, self._clock.now()
        )
        record = next(r for r in self._store.list_secrets(app) if r.name == name)
        return SecretSet(**secret_view(record).model_dump(), version=version)

    def unset(self, app: str, name: str) -> SecretsVersion:
        if name not in {record.name for record in self._store.list_secrets(app)}:
            raise NotFound(f"app {app} has no secret named {name}", field="name")
        return SecretsVersion(
            version=self._store.update_secrets(app, {name: None}, self._clock.now())
        )

    def update(self, app: str, values: Mapping[str, str | None]) -> SecretsUpdated:
        """Several at once, in one version: each set, or removed where ``null``."""
        if not values:
            raise Unprocessable("values: name at least one secret", field="values")
        changes = {
            _name(name, f"values.{name}"): None if value is None else _value(name, value)
            for name, value in values.items()
        }
        version = self._store.update_secrets(app, changes, self._clock.now())
        return SecretsUpdated(
            secrets=[secret_view(r) for r in self._store.list_secrets(app)], version=version
        )


def _no_values(show_secrets: bool) -> None:
    if show_secrets:
        raise UnsupportedField("show_secrets", "asks for values: hangar never shows them")


def _name(name: str, field: str) -> str:
    if not SECRET_NAME_PATTERN.match(name) or len(name) > 256:
        raise Unprocessable(
            f"{field}: a secret's name is a variable name (letters, digits, '_', not starting "
            "with a digit)",
            field=field,
        )
    return name


def _value(name: str, value: str) -> bytes:
    """The value as stored; the error names the secret, never what its value was."""
    if "\0" in value:
        raise Unprocessable(f"secret {name}: its value contains NUL", field="value", secret=name)
    return value.encode()
