"""Parsing the guest's control log (ctl.jsonl)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hangar.vmm.control import GuestReport, read_control_events, summarise_control_events


def test_missing_log_has_no_events(tmp_path: Path) -> None:
    assert read_control_events(tmp_path / "ctl.jsonl") == []


def test_events_are_read_in_order_skipping_blank_and_malformed_lines(tmp_path: Path) -> None:
    log = tmp_path / "ctl.jsonl"
    log.write_bytes(
        b'{"type":"ready"}\n\nnot json\n["type", "exit"]\n{"code": 3}\n{"type":"exit","code":3}\n'
    )

    assert read_control_events(log) == [{"type": "ready"}, {"type": "exit", "code": 3}]


def test_a_cut_short_last_line_is_dropped(tmp_path: Path) -> None:
    log = tmp_path / "ctl.jsonl"
    log.write_bytes(b'{"type":"ready"}\n{"type":"exit","co')

    assert read_control_events(log) == [{"type": "ready"}]


def test_a_whole_last_line_without_its_newline_counts(tmp_path: Path) -> None:
    log = tmp_path / "ctl.jsonl"
    log.write_bytes(b'{"type":"ready"}\n{"type":"exit","code":0}')

    assert read_control_events(log)[-1] == {"type": "exit", "code": 0}


def test_summary_keeps_readiness_and_the_last_exit_and_error() -> None:
    events: list[dict[str, Any]] = [
        {"type": "ready"},
        {"type": "error", "message": "first"},
        {"type": "exit", "code": 1},
        {"type": "log", "line": "kept but ignored"},
        {"type": "error", "message": "second"},
        {"type": "exit", "code": 2},
    ]

    assert summarise_control_events(events) == GuestReport(ready=True, exit_code=2, error="second")


def test_summary_ignores_exit_codes_that_are_not_integers() -> None:
    events: list[dict[str, Any]] = [{"type": "exit", "code": True}, {"type": "exit", "code": "7"}]

    assert summarise_control_events(events) == GuestReport()
