"""The guest's control log: JSON lines the guest init writes to the ``hangar.ctl`` port.

Known events: ``{"type": "ready"}``, ``{"type": "exit", "code": N}``,
``{"type": "error", "message": "..."}``; other types are kept and ignored here.
The host writes the log from what it read of the port (:mod:`hangar.vmm.channels`: only
control events, bounded); a VM started by an earlier version had QEMU write it directly, so
at most :data:`MAX_READ_BYTES` of it (its end, where the exit is) is read. The VM may die in
the middle of a write, so the last line may be cut short.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel

log = logging.getLogger(__name__)

MAX_READ_BYTES = 4 * 1024 * 1024


def read_control_events(control_log: Path) -> list[dict[str, Any]]:
    """Every event in ``control_log`` in order; a missing file has none.

    A last line without its newline counts if it parses (the guest may not have flushed
    the newline yet) and is dropped if it does not. A malformed line elsewhere is logged
    and skipped.
    """
    try:
        with control_log.open("rb") as stream:
            stream.seek(0, 2)
            size = stream.tell()
            stream.seek(max(0, size - MAX_READ_BYTES))
            data = stream.read(MAX_READ_BYTES)
    except FileNotFoundError:
        return []
    if size > MAX_READ_BYTES:
        data = data.partition(b"\n")[2]  # the first line is cut: skip it
    *complete_lines, last_line = data.split(b"\n")
    events = []
    malformed = 0
    for line in complete_lines:
        if not line.strip():
            continue
        event = _parse_event(line)
        if event is None:
            malformed += 1
        else:
            events.append(event)
    if malformed or size > MAX_READ_BYTES:
        log.warning(
            "%s: %d lines are not control events; %d bytes not read",
            control_log,
            malformed,
            max(0, size - MAX_READ_BYTES),
        )
    if last_line.strip():
        event = _parse_event(last_line)
        if event is not None:
            events.append(event)
    return events


def _parse_event(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(value, dict) and isinstance(value.get("type"), str):
        return value
    return None


class GuestReport(BaseModel):
    """What the guest has said about itself so far."""

    ready: bool = False
    exit_code: int | None = None
    error: str | None = None


def summarise_control_events(events: list[dict[str, Any]]) -> GuestReport:
    """Ready if it ever said so; the last exit code and the last error win."""
    report = GuestReport()
    for event in events:
        kind = event["type"]
        if kind == "ready":
            report.ready = True
        elif kind == "exit":
            code = event.get("code")
            if isinstance(code, int) and not isinstance(code, bool):
                report.exit_code = code
        elif kind == "error":
            report.error = str(event.get("message", "the guest reported an error"))
    return report
