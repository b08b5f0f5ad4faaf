"""Durations as Fly's API carries them: Go duration strings, numbers, ``{"Duration": ns}``.

``parse_duration_seconds`` reads what clients send; ``go_duration`` writes what Go's
``time.Duration.String()`` writes, which is how Fly answers durations back.
"""

from __future__ import annotations

import math
import re

GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
MAX_DURATION_S = 24 * 3600.0
_MESSAGE = "must be a duration such as 10s, 500ms, 2m or 1m30s"


def _parse_go_duration(text: str) -> float:
    text = text.strip()
    if text in ("0", "+0"):
        return 0.0
    if text.startswith("+"):
        text = text[1:]
    position = 0
    seconds = 0.0
    while position < len(text):
        match = GO_DURATION_PART.match(text, position)
        if match is None:
            raise ValueError(_MESSAGE)
        seconds += float(match.group(1)) * DURATION_UNITS[match.group(2)]
        position = match.end()
    if position == 0:
        raise ValueError(_MESSAGE)
    return seconds


def parse_duration_seconds(value: object) -> float:
    """Fly durations: seconds, ``"5s"``, ``"500ms"``, ``"1m30s"``, or ``{"Duration": ns}``."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 10s")
    try:
        if isinstance(value, int | float):
            seconds = float(value)
        elif isinstance(value, str):
            seconds = _parse_go_duration(value)
        elif isinstance(value, dict) and set(value) == {"Duration"}:
            nanoseconds = value["Duration"]
            if not isinstance(nanoseconds, int) or isinstance(nanoseconds, bool):
                raise ValueError("Duration must be an integer number of nanoseconds")
            seconds = nanoseconds / 1e9
        else:
            raise ValueError("must be a duration such as 10s")
    except OverflowError:
        raise ValueError("must be between 0s and 24h") from None
    if not math.isfinite(seconds) or seconds < 0 or seconds > MAX_DURATION_S:
        raise ValueError("must be between 0s and 24h")
    return seconds


def _decimal(value: int, scale: int) -> str:
    whole, fraction = divmod(value, scale)
    if not fraction:
        return str(whole)
    digits = str(fraction).rjust(len(str(scale)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}"


def go_duration(seconds: float) -> str:
    """``90.0`` -> ``"1m30s"``, ``0.5`` -> ``"500ms"``, ``3600`` -> ``"1h0m0s"`` (Go's format)."""
    nanoseconds = round(seconds * 1e9)
    if nanoseconds == 0:
        return "0s"
    if nanoseconds < 1000:
        return f"{nanoseconds}ns"
    if nanoseconds < 1_000_000:
        return f"{_decimal(nanoseconds, 1000)}µs"
    if nanoseconds < 1_000_000_000:
        return f"{_decimal(nanoseconds, 1_000_000)}ms"
    hours, rest = divmod(nanoseconds, 3600 * 10**9)
    minutes, rest = divmod(rest, 60 * 10**9)
    text = f"{_decimal(rest, 10**9)}s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text
