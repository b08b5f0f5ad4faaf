"""Server-sent events passing through the gateway: cut into events as they complete, each
looked at for the end marker and for ``usage``, and passed on byte for byte.

Only an event that mentions ``usage`` is parsed; every other event is forwarded as it came.
The gateway asks the engine for usage on every stream (``stream_options.include_usage``) so
that it can meter; ``StreamTally`` drops that usage-only event again when the client did not
ask for it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from hangar.errors import BadGateway

_EVENT_END = re.compile(rb"\r?\n\r?\n")
DONE_MARKER = b"[DONE]"


class EventSplitter:
    """Cut a byte stream into whole events (each with its blank line), holding at most
    ``max_event_bytes`` of an unfinished one."""

    def __init__(self, max_event_bytes: int) -> None:
        self._buffer = b""
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk
        events: list[bytes] = []
        start = 0
        for match in _EVENT_END.finditer(self._buffer):
            events.append(self._buffer[start : match.end()])
            start = match.end()
        self._buffer = self._buffer[start:]
        if len(self._buffer) > self._max:
            raise BadGateway(
                f"the replica sent an event longer than {self._max} bytes",
                limit=self._max,
            )
        return events

    @property
    def pending(self) -> bytes:
        return self._buffer


def event_data(event: bytes) -> bytes:
    """The event's ``data`` (lines joined by newlines, as the SSE format says)."""
    lines = [line.rstrip(b"\r") for line in event.split(b"\n")]
    parts = [line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:")]
    return b"\n".join(parts)


@dataclass
class StreamTally:
    """What went by in one stream: whether it finished, the usage the engine reported, and
    how many events carried choices (a lower bound on completion tokens if it broke off)."""

    strip_usage_event: bool
    done: bool = False
    usage: dict[str, Any] | None = None
    choice_events: int = 0

    def see(self, event: bytes) -> bool:
        """Take note of one event; whether to pass it on."""
        data = event_data(event)
        if data.strip() == DONE_MARKER:
            self.done = True
            return True
        if b'"usage"' not in data:
            if b'"choices"' in data:
                self.choice_events += 1
            return True
        try:
            parsed = json.loads(data)
        except ValueError:
            return True
        if not isinstance(parsed, dict):
            return True
        usage = parsed.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = parsed.get("choices")
        if choices:
            self.choice_events += 1
        return not (self.strip_usage_event and choices == [] and isinstance(usage, dict))


def token_counts(usage: dict[str, Any] | None) -> tuple[int, int] | None:
    """``(prompt_tokens, completion_tokens)`` of an OpenAI ``usage`` object, if it has them."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens", 0)
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return max(0, prompt), max(0, completion)
