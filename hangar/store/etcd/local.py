"""A local etcd cluster on loopback: N real ``etcd`` processes with their own data folders.

Tests and ``hangar bench placement --etcd-cluster N`` start one; fault tests stop and start
single members. Ports are free ones picked at start; every process is stopped and its data
removed by ``close`` (also on a failed start). A member started again keeps its ports and data
folder, so it rejoins the cluster as the same member.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from hangar.localhost import free_port

ETCD_BINARY = "etcd"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
START_ATTEMPTS = 3
"""Whole-cluster starts tried when a member cannot bind the ports picked for it."""
POLL_INTERVAL_S = 0.05


class EtcdLaunchError(RuntimeError):
    """A local etcd member did not start or become healthy (its log tail is in the message)."""


@dataclass(slots=True)
class LocalMember:
    name: str
    data_dir: Path
    client_port: int
    peer_port: int
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.data_dir.with_suffix(".log")

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class LocalEtcdCluster:
    """``size`` etcd members on 127.0.0.1. Use as a context manager, or ``start``/``close``."""

    def __init__(
        self,
        size: int = 3,
        base_dir: Path | None = None,
        *,
        binary: str = ETCD_BINARY,
        heartbeat_ms: int = 100,
        election_ms: int = 1000,
        extra_client_hosts: tuple[str, ...] = (),
    ) -> None:
        """``extra_client_hosts``: addresses (besides loopback) every member also answers
        clients on: a test's own bridge or veth addresses, for agents in network namespaces."""
        if size < 1:
            raise ValueError("an etcd cluster needs at least one member")
        if shutil.which(binary) is None:
            raise EtcdLaunchError(f"{binary} is not installed (apt-get install etcd-server)")
        self.size = size
        self.extra_client_hosts = extra_client_hosts
        self._binary = binary
        self._heartbeat_ms = heartbeat_ms
        self._election_ms = election_ms
        self._own_dir = base_dir is None
        self.base_dir = base_dir or Path(tempfile.mkdtemp(prefix="hangar-etcd-"))
        self.members: list[LocalMember] = []
        self._token = f"hangar-{secrets.token_hex(4)}"

    @property
    def endpoints(self) -> list[str]:
        """Client URLs of every member, running or not (clients fail over between them)."""
        return [member.client_url for member in self.members]

    def endpoints_at(self, host: str) -> list[str]:
        """The members' client URLs on one of ``extra_client_hosts``."""
        if host not in self.extra_client_hosts:
            raise ValueError(f"etcd does not listen on {host}")
        return [f"http://{host}:{member.client_port}" for member in self.members]

    def start(self) -> Self:
        """Start every member and wait until each answers healthy."""
        last_error: EtcdLaunchError | None = None
        for _ in range(START_ATTEMPTS):
            self._stop_all()
            self._plan()
            try:
                for member in self.members:
                    self._launch(member, state="new")
                self.wait_healthy()
                return self
            except EtcdLaunchError as error:
                last_error = error
                if not self._port_clash():
                    break
        self.close()
        assert last_error is not None
        raise last_error

    def stop_member(self, index: int, *, kill: bool = False) -> None:
        """Stop one member (SIGTERM, or SIGKILL as a crash would); its data stays."""
        member = self.members[index]
        process = member.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def start_member(self, index: int) -> None:
        """Start a stopped member again on its ports and data; it rejoins the cluster."""
        member = self.members[index]
        if member.running:
            return
        self._launch(member, state="existing")
        self._wait_member(member, require_health=False)

    def cpu_seconds(self) -> float:
        """CPU time (user and system) the running members have used so far."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for member in self.members:
            if member.running and member.process is not None:
                try:
                    fields = Path(f"/proc/{member.process.pid}/stat").read_text().split(") ")[1]
                except OSError:
                    continue
                values = fields.split()
                total += (int(values[11]) + int(values[12])) / ticks
        return total

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait until every running member reports a healthy cluster (a leader, quorum)."""
        deadline = time.monotonic() + timeout_s
        for member in self.members:
            if member.process is not None:
                self._wait_member(member, require_health=True, deadline=deadline)

    def close(self) -> None:
        self._stop_all()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _plan(self) -> None:
        run = secrets.token_hex(3)
        self.members = [
            LocalMember(f"m{n}", self.base_dir / f"m{n}-{run}", free_port(), free_port())
            for n in range(self.size)
        ]

    def _launch(self, member: LocalMember, state: str) -> None:
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        argv = [
            self._binary,
            f"--name={member.name}",
            f"--data-dir={member.data_dir}",
            "--listen-client-urls="
            + ",".join(
                [member.client_url]
                + [f"http://{host}:{member.client_port}" for host in self.extra_client_hosts]
            ),
            f"--advertise-client-urls={member.client_url}",
            f"--listen-peer-urls={member.peer_url}",
            f"--initial-advertise-peer-urls={member.peer_url}",
            f"--initial-cluster={initial}",
            f"--initial-cluster-state={state}",
            f"--initial-cluster-token={self._token}",
            f"--heartbeat-interval={self._heartbeat_ms}",
            f"--election-timeout={self._election_ms}",
            "--logger=zap",
            "--log-outputs=stderr",
            "--log-level=warn",
        ]
        with member.log_path.open("ab") as log:
            member.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    def _wait_member(
        self, member: LocalMember, *, require_health: bool, deadline: float | None = None
    ) -> None:
        deadline = deadline or time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if not member.running:
                raise EtcdLaunchError(f"etcd {member.name} exited:\n{member.log_tail()}")
            answer = _get_json(member, "/health" if require_health else "/version")
            if answer is not None and (not require_health or answer.get("health") == "true"):
                return
            time.sleep(POLL_INTERVAL_S)
        raise EtcdLaunchError(f"etcd {member.name} not ready in time:\n{member.log_tail()}")

    def _port_clash(self) -> bool:
        return any("address already in use" in member.log_tail() for member in self.members)

    def _stop_all(self) -> None:
        for index in range(len(self.members)):
            self.stop_member(index)


def _get_json(member: LocalMember, path: str) -> dict[str, object] | None:
    connection = http.client.HTTPConnection("127.0.0.1", member.client_port, timeout=2.0)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            return None
        answer = json.loads(body)
        return answer if isinstance(answer, dict) else None
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        connection.close()
