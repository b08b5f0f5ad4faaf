"""A ``llama-server`` process on this host, on loopback: for tests, demos and the benchmark's
direct baseline, where no machine is needed.

It is configured through ``LLAMA_ARG_*`` variables only, exactly as a machine running the
engine image is, listens on a port the kernel picks, and its address is read from its log.
``suspend`` and ``resume`` stop and continue the process (memory kept, as a suspended machine
keeps it); ``stop`` ends it. Every process started here is ended by ``stop``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from hangar.errors import EngineError

_LISTENING = re.compile(rb"listening on (http://[0-9.]+:\d+)")
STOP_GRACE_S = 5.0
LOOPBACK = "127.0.0.1"
LOG_TAIL_BYTES = 4000


class EngineArgs(BaseModel):
    """How to run ``llama-server`` over one GGUF model."""

    model_config = ConfigDict(frozen=True)

    model: Path  # as the engine sees it (a path in the guest, for a machine)
    alias: str | None = None  # the name answers carry as ``model``
    parallel: int = Field(default=2, ge=1, le=64)  # requests served at once
    context: int = Field(default=1024, ge=64)  # tokens, shared by the parallel slots
    threads: int = Field(default=1, ge=1, le=256)
    embeddings: bool = True
    metrics: bool = True  # Prometheus counters at /metrics

    def environment(self) -> dict[str, str]:
        """These settings as llama-server's ``LLAMA_ARG_*`` variables: what a machine running
        the engine image sets (the image itself sets host and port)."""
        env = {
            "LLAMA_ARG_MODEL": str(self.model),
            "LLAMA_ARG_N_PARALLEL": str(self.parallel),
            "LLAMA_ARG_CTX_SIZE": str(self.context),
            "LLAMA_ARG_THREADS": str(self.threads),
            "LLAMA_ARG_THREADS_HTTP": str(max(2, self.parallel)),
        }
        if self.alias:
            env["LLAMA_ARG_ALIAS"] = self.alias
        if self.embeddings:
            env["LLAMA_ARG_EMBEDDINGS"] = "1"
            env["LLAMA_ARG_POOLING"] = "mean"
        if self.metrics:
            env["LLAMA_ARG_ENDPOINT_METRICS"] = "1"
        return env


class EngineProcess:
    def __init__(self, binary: Path, args: EngineArgs, log_path: Path) -> None:
        self.binary = binary
        self.args = args
        self.log_path = log_path
        self.address: str | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout_s: float = 60.0) -> str:
        """Start the process; return its address once it listens (the model may still be
        loading: its ``/health`` answers 503 until it is ready)."""
        if self.alive():
            raise EngineError("the engine process is already running", pid=self.pid)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Configured through the environment only, as the engine image is: the same contract.
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LLAMA_ARG_HOST": LOOPBACK,
            "LLAMA_ARG_PORT": "0",  # the kernel picks a free port; the log says which
            **self.args.environment(),
        }
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                [str(self.binary)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = _LISTENING.search(self.log_path.read_bytes())
            if found:
                self.address = found.group(1).decode()
                return self.address
            if not self.alive():
                break
            time.sleep(0.02)
        self.stop()
        raise EngineError(
            f"llama-server did not start listening within {timeout_s:g} s: {self.log_tail()}",
            model=str(self.args.model),
        )

    def suspend(self) -> None:
        if self._process is not None and self.alive():
            os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None and self.alive():
            os.kill(self._process.pid, signal.SIGCONT)

    def kill(self) -> None:
        """End it abruptly (SIGKILL), as a crashing replica would."""
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            self._process.wait()

    def stop(self) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)
                process.terminate()
            try:
                process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.address = None

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_bytes()[-LOG_TAIL_BYTES:].decode(errors="replace")
        return ""
