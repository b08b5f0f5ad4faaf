"""Durations, as Fly's clients write them: one grammar for every duration hangar reads.

Go's ``time.ParseDuration`` grammar (``"10s"``, ``"1m0s"``, ``"1h2m3.5s"``, ``"500ms"``,
``"250us"``, ``"0"``), plus ``d`` for days (token lifetimes); a JSON number is nanoseconds and
``{"Duration": nanoseconds}`` is how some clients wrap one (both as fly-go decodes them).
Written back as Go writes them (``time.Duration.String()``), so a config reads as it was sent.
"""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_TERM = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h|d)")
_MAX_TEXT = 64
HOUR_S = 3600.0
DAY_S = 86400.0
MAX_CONFIG_DURATION_S = 24 * HOUR_S
MAX_TOKEN_LIFETIME_S = 366 * DAY_S


def parse_duration(
    value: object, *, maximum: float = MAX_CONFIG_DURATION_S, minimum: float = 0.0
) -> float:
    """Seconds, from any form above; ``ValueError`` (naming the grammar) otherwise."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 10s")
    if isinstance(value, dict) and set(value) == {"Duration"}:
        value = value["Duration"]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("Duration must be an integer number of nanoseconds")
    if isinstance(value, int | float):
        seconds = _finite(float(value)) / 1e9
    elif isinstance(value, str):
        seconds = _parse_text(value.strip())
    else:
        raise ValueError("must be a duration such as 10s")
    if seconds < minimum or seconds > maximum:
        raise ValueError(
            f"must be between {format_duration(minimum)} and {format_duration(maximum)}"
        )
    return seconds


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite duration")
    return value


def _parse_text(text: str) -> float:
    if text == "0":
        return 0.0
    if not text or len(text) > _MAX_TEXT:
        raise ValueError("must be a duration such as 10s, 1m30s or 500ms")
    position, total = 0, 0.0
    while position < len(text):
        match = _TERM.match(text, position)
        if match is None:
            raise ValueError("must be a duration such as 10s, 1m30s or 500ms")
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    return _finite(total)


def format_duration(seconds: float) -> str:
    """As Go's ``time.Duration.String()``: ``1h2m3.5s``, ``1m0s``, ``500ms``, ``0s``."""
    nanoseconds = round(seconds * 1e9)
    if nanoseconds == 0:
        return "0s"
    sign = "-" if nanoseconds < 0 else ""
    nanoseconds = abs(nanoseconds)
    if nanoseconds < 1_000_000_000:
        for unit, size in (("ms", 1_000_000), ("µs", 1_000), ("ns", 1)):
            if nanoseconds >= size:
                return sign + _decimal(nanoseconds, size) + unit
    hours, rest = divmod(nanoseconds, 3600 * 10**9)
    minutes, rest = divmod(rest, 60 * 10**9)
    text = _decimal(rest, 10**9) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{text}"
    if minutes:
        return f"{sign}{minutes}m{text}"
    return sign + text


def _decimal(value: int, unit: int) -> str:
    whole, fraction = divmod(value, unit)
    if not fraction:
        return str(whole)
    digits = str(fraction).rjust(len(str(unit)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}"


def _config_duration(value: object) -> float:
    return parse_duration(value)


def _token_lifetime(value: object) -> float:
    return parse_duration(value, maximum=MAX_TOKEN_LIFETIME_S, minimum=1.0)


_SCHEMA = WithJsonSchema({"type": "string", "examples": ["10s", "1m0s", "500ms"]})
Duration = Annotated[
    float,
    BeforeValidator(_config_duration),
    PlainSerializer(format_duration, return_type=str),
    _SCHEMA,
]
"""A duration field of a request or config (at most 24h), in seconds, written back in Go's form."""

TokenLifetime = Annotated[
    float,
    BeforeValidator(_token_lifetime),
    PlainSerializer(format_duration, return_type=str),
    _SCHEMA,
]
"""How long a token lives (at most 366 days)."""
