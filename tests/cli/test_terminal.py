"""The ``hangar`` command in a real terminal (tmux, 80 columns) against a real server and real
machines, read off the screen: the boot's progress, output, a list that fits 80 columns by
cutting the image and never an id or a name, ``logs -f`` following a machine to its end,
``machine status``, and errors as one line with the API's sentence and HTTP status."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hangar.server_process import ServerProcess, free_port
from tests.cli.terminal import COLUMNS, Terminal
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def terminal(shared_server: ServerProcess, app_name: str, test_image: str) -> Iterator[Terminal]:
    env = {
        "HANGAR_API_URL": shared_server.url,
        "HANGAR_API_TOKEN": shared_server.operator_token,
        "PATH": f"{VENV_BIN}:/usr/bin:/bin",
        "HOME": str(shared_server.home),
        "TERM": "xterm-256color",
        "LANG": "C.UTF-8",
        "APP": app_name,
        "IMAGE": test_image,
    }
    with Terminal(env, REPO_ROOT) as opened:
        yield opened


def line_with(screen: str, text: str) -> str:
    lines = [line for line in screen.splitlines() if text in line]
    assert lines, f"{text!r} is not on the screen:\n{screen}"
    return lines[-1]


def test_run_list_status_and_logs_read_well_at_80_columns(terminal: Terminal) -> None:
    name = "a-rather-long-machine-name-for-80-columns"
    output, status = terminal.run(
        f"hangar machine run $IMAGE -a $APP --name {name} -- sh -c 'echo hi-from-tmux'"
    )
    assert status == 0, output
    for stage in ("image ready", "root filesystem built", "initramfs built", "booted"):
        assert f"✓ {stage} (" in output, output
    assert "hi-from-tmux" in output and "exit code 0" in output

    terminal.clear()
    listed, status = terminal.run("hangar machine list -a $APP")
    assert status == 0, listed
    as_json = subprocess.run(
        [VENV_BIN / "hangar", "machine", "list", "-a", terminal.env["APP"], "--json"],
        check=True,
        capture_output=True,
        text=True,
        env=terminal.env,
    )
    machine_id = json.loads(as_json.stdout)[0]["id"]
    row = line_with(terminal.history(), machine_id)
    assert name in row and "stopped" in row, row
    assert "…" in row, f"the image should be cut to fit:\n{terminal.history()}"
    assert len(row.rstrip()) <= COLUMNS

    terminal.clear()
    shown, status = terminal.run(f"hangar machine status {machine_id} -a $APP")
    assert status == 0, shown
    for heading in ("ID", "Private IP", "Ports", "Checks", "Events"):
        assert heading in shown, shown
    assert line_with(terminal.history(), machine_id).split()[-1] == machine_id
    assert "exit" in shown and "stopped" in shown


def test_logs_follow_a_machine_until_it_stops(terminal: Terminal) -> None:
    ticker = "for i in 1 2 3; do echo tick-$i; sleep 1; done"
    created, status = terminal.run(
        f"ID=$(hangar machine run $IMAGE -a $APP -d -- sh -c '{ticker}')"
    )
    assert status == 0, created
    followed, status = terminal.run("hangar logs $ID -a $APP -f")
    assert status == 0, followed
    assert followed.index("tick-1") < followed.index("tick-2") < followed.index("tick-3")


def test_errors_are_one_line_with_the_api_sentence_and_status(terminal: Terminal) -> None:
    missing, status = terminal.run("hangar machine status 0123456789abcd -a $APP")
    assert status == 1
    assert "error: machine 0123456789abcd not found in app" in missing
    assert "(HTTP 404 not_found)" in missing and "Traceback" not in missing
    refused, status = terminal.run("hangar orgs create 'Not A Slug!'")
    assert status == 1 and "(HTTP 422" in refused and "Traceback" not in refused
    port = free_port()
    down, status = terminal.run(f"HANGAR_API_URL=http://127.0.0.1:{port} hangar apps list")
    assert status == 1 and "error: cannot reach the hangar API" in down
    assert "Traceback" not in down
    streamed, status = terminal.run("hangar logs 0123456789abcd -a $APP -f")
    assert status == 1 and "(HTTP 404 not_found)" in streamed and "Traceback" not in streamed
