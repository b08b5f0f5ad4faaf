"""A ``hangar server`` child process on loopback with its own $HANGAR_HOME (benchmarks, tests).

Tests crash it (SIGKILL) and start it again over the same home to check recovery. Its rate
limits are raised (benchmarks and tests poll fast) unless ``extra_env`` sets them; its private
network is its own (bridge, taps, tables, prefix: ``hangar.net.scratch``) and has no egress;
its proxy listens on loopback; its ``client()`` carries the operator token the server wrote
at its first start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Generator
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

from hangar.localhost import free_port
from hangar.net.scratch import scratch_network_settings
from hangar.settings import OPERATOR_TOKEN_FILE, env_name

STARTUP_TIMEOUT_S = 90.0
"""Importing and starting a server takes 15 s on a busy 2-core host, and past 30 s at times."""
RAISED_RATE_LIMITS = {
    env_name("rate_limits"): "default=10000/10000,get_machine=10000/10000",
    env_name("anonymous_rate_limit"): "10000/10000",
}
# The proxy listens on loopback, each service port on a free port of its own.
LOOPBACK_PROXY = {env_name("proxy_bind"): "127.0.0.1"}


class BearerToken(httpx.Auth):
    def __init__(self, secret: str) -> None:
        self._header = f"Bearer {secret}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._header
        yield request


class ServerProcess:
    def __init__(self, home: Path, extra_env: dict[str, str] | None = None) -> None:
        self.home = home
        self.port = free_port()
        self.extra_env = {
            **RAISED_RATE_LIMITS,
            **LOOPBACK_PROXY,
            **scratch_network_settings(),
            **(extra_env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.home / "server.log"

    def start(self, extra_env: dict[str, str] | None = None) -> None:
        env = {
            **os.environ,
            env_name("llm_port"): "0",  # the gateway on a free port: servers run side by side
            **self.extra_env,
            **(extra_env or {}),
            env_name("home"): str(self.home),
        }
        self.home.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*self.launcher(), sys.executable, "-m", "hangar.cli.main", *self.command()],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"hangar {self.command()[0]} exited at start:\n{self.log_tail()}"
                )
            if self.ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"hangar {self.command()[0]} was not ready in time:\n{self.log_tail()}")

    def launcher(self) -> list[str]:
        """What runs the process (e.g. ``ip netns exec NS``); nothing by default."""
        return []

    def command(self) -> list[str]:
        """The ``hangar`` subcommand and its arguments."""
        return ["server", "--port", str(self.port)]

    def ready(self) -> bool:
        try:
            httpx.get(f"{self.url}/v1/apps", timeout=1.0)
            return True
        except httpx.TransportError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def wait_exit(self, timeout_s: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout_s)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def remove_network(self) -> None:
        """Remove the server's private network from this host (its bridge, taps and tables):
        what a test made, it takes away."""
        from hangar.net.host import HostNetConfig, HostNetwork
        from hangar.settings import Settings

        values = {
            key.removeprefix("HANGAR_").lower(): value
            for key, value in self.extra_env.items()
            if key.startswith("HANGAR_NET")
        }
        HostNetwork(HostNetConfig.from_settings(Settings.model_validate(values))).teardown()

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    @property
    def operator_token(self) -> str:
        return (self.home / OPERATOR_TOKEN_FILE).read_text().strip()

    def client(self, token: str | None = None) -> httpx.Client:
        """A client of the API acting with ``token`` (default: the operator token), on every
        request it sends, including ones built elsewhere and passed to ``send``."""
        secret = self.operator_token if token is None else token
        return httpx.Client(base_url=self.url, timeout=90.0, auth=BearerToken(secret))

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stopped, and its private network (bridge, taps, tables) gone from the host."""
        self.stop()
        self.remove_network()


class ApiReplicaProcess(ServerProcess):
    """``hangar api --etcd``: one API replica of a fleet."""

    def __init__(self, home: Path, etcd: list[str], extra_env: dict[str, str] | None = None):
        super().__init__(home, extra_env)
        self.etcd = etcd

    def command(self) -> list[str]:
        return ["api", "--etcd", ",".join(self.etcd), "--port", str(self.port)]


class AgentProcess(ServerProcess):
    """``hangar agent --etcd``: one host of a fleet; ready once its host is registered."""

    def __init__(
        self,
        home: Path,
        etcd: list[str],
        host_id: str,
        region: str,
        pool: str,
        extra_env: dict[str, str] | None = None,
        namespace: str | None = None,
        registry_etcd: list[str] | None = None,
    ):
        """``namespace``: a network namespace the agent runs in (its own host), reaching
        etcd at ``etcd``; ``registry_etcd``: where this process sees the same etcd (to know
        when the host registered), when that differs."""
        super().__init__(home, extra_env)
        self.etcd = etcd
        self.namespace = namespace
        self.registry_etcd = registry_etcd or etcd
        self.host_id = host_id
        self.region = region
        self.pool = pool

    def launcher(self) -> list[str]:
        return ["ip", "netns", "exec", self.namespace] if self.namespace else []

    def command(self) -> list[str]:
        return [
            "agent",
            "--etcd",
            ",".join(self.etcd),
            "--host-id",
            self.host_id,
            "--region",
            self.region,
            "--pool",
            self.pool,
        ]

    def ready(self) -> bool:
        from hangar.store.etcd.client import EtcdClient
        from hangar.store.etcd.keys import KeyLayout

        prefix = self.extra_env.get(env_name("etcd_prefix"), "/hangar")
        client = EtcdClient(self.registry_etcd, timeout_s=1.0)
        try:
            return client.get(KeyLayout(prefix).host(self.host_id)) is not None
        except Exception:
            return False
        finally:
            client.close()

    def remove_network(self) -> None:
        """A fleet test's agent runs in a network namespace of its own: its private network
        goes with the namespace (or it runs without one)."""
