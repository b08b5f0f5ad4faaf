"""Fly's JSON as Go's decoder reads it: the base of every request object a Fly client sends.

fly-go (what flyctl and most tools use) decodes with Go's ``encoding/json``, and Fly's server
accepts what that decoder accepts:

- a key the object does not know is ignored (hangar logs its name at debug level, never its
  value);
- ``null`` leaves a field at its zero value: an absent map or list, a default, or (for a field
  that may be ``null``) ``None``; a required field that is ``null`` is missing;
- a field hangar cannot honour is refused (a 422 naming it) only when it is set to something
  other than its zero value: ``"init": {}``, ``"skip_secrets": false`` or
  ``"dns": {"skip_registration": false}`` are fine (:func:`is_zero`, :func:`refuse_unless_zero`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from hangar.errors import UnsupportedField

log = logging.getLogger(__name__)
MAX_LOGGED_KEYS = 20


def is_zero(value: object) -> bool:
    """Go's zero value (``null``, ``""``, ``0``, ``false``, empty list or map), or a map of
    nothing but zero values."""
    if value is None or value is False or value == "" or value == [] or value == {}:
        return True
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float) and value == 0:
        return True
    if isinstance(value, dict):
        return all(is_zero(item) for item in value.values())
    return False


def refuse_unless_zero(data: object, names: Iterable[str], prefix: str) -> None:
    """Raise :class:`UnsupportedField` for the first of ``names`` that ``data`` sets to a
    value other than its zero value."""
    if not isinstance(data, dict):
        return
    for name in names:
        if not is_zero(data.get(name)):
            raise UnsupportedField(f"{prefix}{name}")


class FlyModel(BaseModel):
    """A Fly request object: unknown keys dropped, ``null`` as Go's zero value."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _as_go_decodes(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        known = set(fields) | {field.alias for field in fields.values() if field.alias}
        unknown = [str(key) for key in data if key not in known]
        if unknown:
            log.debug(
                "%s: ignoring keys hangar does not know: %s",
                cls.__name__,
                ", ".join(sorted(unknown)[:MAX_LOGGED_KEYS]),
            )
        return {
            key: value
            for key, value in data.items()
            if key in known and not (value is None and _null_means_default(cls, key))
        }


def _null_means_default(model: type[BaseModel], key: str) -> bool:
    """``null`` for ``key`` leaves the field at its default unless ``None`` is that default."""
    field = model.model_fields.get(key)
    if field is None:
        field = next((f for f in model.model_fields.values() if f.alias == key), None)
    return field is not None and not (field.default is None and field.default_factory is None)
