"""Slowloris: idle and half-sent connections cannot hold the API's listener. A real
``hangar server`` (sockets are what this is about), a connection cap below its file limit,
a header deadline, and one log line per episode."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hangar.server_process import ServerProcess
from tests.conftest import kill_vmms_under

CAP = 16
HEADER_TIMEOUT_S = 1.0
IDLE = 40
HALF_SENT = 10
GUARD_S = 30.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    env = {"HANGAR_MAX_CONNECTIONS": str(CAP), "HANGAR_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S)}
    process = ServerProcess(tmp_path / "home", env)
    process.start()
    try:
        yield process
    finally:
        process.stop()
        kill_vmms_under(process.home)
        process.remove_network()


def closed_by_server(connection: socket.socket) -> bool:
    """True once the server closed ``connection`` (what it sent before is read and dropped)."""
    try:
        while True:
            data = connection.recv(4096)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def still_open(connections: list[socket.socket]) -> list[socket.socket]:
    """The connections the server has not closed within the guard time."""
    deadline = time.monotonic() + GUARD_S
    open_ones = list(connections)
    while open_ones and time.monotonic() < deadline:
        open_ones = [c for c in open_ones if not closed_by_server(c)]
        time.sleep(0.1)
    return open_ones


def test_idle_and_half_sent_connections_are_capped_and_timed_out(server: ServerProcess) -> None:
    connections: list[socket.socket] = []
    try:
        for n in range(IDLE + HALF_SENT):
            connection = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            if n >= IDLE:
                connection.sendall(b"GET /v1/apps HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            connection.setblocking(False)
            connections.append(connection)
        open_ones = still_open(connections)
        assert not open_ones, f"{len(open_ones)} connections still held open by the server"
        with server.client() as api:
            assert api.get("/v1/apps").status_code == 200
    finally:
        for connection in connections:
            connection.close()
    log = server.log_path.read_text()
    assert log.count("API connections past the cap: flood from") == 1, server.log_tail()
    assert log.count("too slow to send their headers: flood from") == 1, server.log_tail()
    assert "Too many open files" not in log


def test_the_access_log_does_not_echo_long_paths(server: ServerProcess) -> None:
    long = "y" * 20_000
    with server.client() as api:
        response = api.get(f"/v1/apps/{long[:12_000]}")
        assert response.status_code == 404
    with httpx.Client(base_url=server.url) as anonymous:
        assert anonymous.get(f"/{long}").status_code in (400, 404, 431)
    log = server.log_path.read_text()
    assert long[:1000] not in log


def test_the_model_gateway_is_bounded_as_the_api_is(server: ServerProcess) -> None:
    """The gateway (OpenAI's API) listens with the same connection cap and header deadline:
    idle connections past the cap are refused, the rest closed at the deadline, and it goes
    on answering."""
    found = re.search(r"model gateway: (http://\S+)/v1", server.log_path.read_text())
    assert found is not None, server.log_tail()
    base = found.group(1)
    port = int(base.rsplit(":", 1)[1])
    connections = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(IDLE)]
    try:
        for connection in connections:
            connection.setblocking(False)
        open_ones = still_open(connections)
        assert not open_ones, f"{len(open_ones)} connections still held open by the gateway"
        assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 401
    finally:
        for connection in connections:
            connection.close()
    log = server.log_path.read_text()
    assert log.count("model gateway connections past the cap: flood from") == 1, server.log_tail()
    assert "Too many open files" not in log
