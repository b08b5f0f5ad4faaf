"""The guest's control log: JSON lines the guest init writes to the ``hangar.ctl`` port.

Known events: ``{"type": "ready"}``, ``{"type": "exit", "code": N}``,
``{"type": "error", "message": "..."}``; other types are kept and ignored here.
The log is a file so that a guest's exit survives an agent crash; the VM may die in the
middle of a write, so the last line may be cut short.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel

log = logging.getLogger(__name__)


def read_control_events(control_log: Path) -> list[dict[str, Any]]:
    """Every event in ``control_log`` in order; a missing file has none.

    A last line without its newline counts if it parses (the guest may not have flushed
    the newline yet) and is dropped if it does not. A malformed line elsewhere is logged
    and skipped.
    """
    try:
        data = control_log.read_bytes()
    except FileNotFoundError:
        return []
    *complete_lines, last_line = data.split(b"\n")
    events = []
    for number, line in enumerate(complete_lines, start=1):
        if not line.strip():
            continue
        event = _parse_event(line)
        if event is None:
            log.warning("%s line %d is not a control event: %r", control_log, number, line[:200])
        else:
            events.append(event)
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
