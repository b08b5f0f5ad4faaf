"""Device operations in a killable worker process, each with a deadline.

A sysfs write can block for as long as the kernel likes: the ``nvidia`` driver's unbind
loops while anything holds the GPU (nvidia-persistenced, DCGM, any NVML user), a ``reset``
polls up to a minute for the device to come back, and an NVML call can hang on a GPU that
fell off the bus. Run in the agent's own process, such a call hangs the agent and the GPU
is never quarantined. So each operation runs in a child process
(``python -m hangar.devices.worker``) that is killed when its deadline passes; the caller
gets :class:`DeviceError` with ``timed_out=True`` and quarantines. This module is the
parent's side; :mod:`hangar.devices.workerproc` is the child's.

A child stuck in the kernel (uninterruptible sleep) cannot be killed; it is then left to a
reaper thread and the error says so (``stuck=True``): the device is in an unknown state.

The protocol is one JSON object on stdin, ``{"target": "module:function", "kwargs": {...}}``,
and one on stdout, ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {...}}``.
``target`` names an importable function taking JSON-able keyword arguments.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from hangar.devices.sysfs import DEFAULT_SYSFS_ROOT, SysfsRoot
from hangar.devices.workerproc import resolve_target
from hangar.errors import DeviceError

WORKER_MODULE = "hangar.devices.workerproc"
WRITE_TARGET = "hangar.devices.sysfs:write_attribute"
_MESSAGE_LIMIT = 2000


class DeviceDeadlines(BaseModel):
    """How long each kind of device operation may take before it counts as hung."""

    model_config = ConfigDict(frozen=True)

    write_s: float = 10.0
    """Plain attributes: ``driver_override``, ``reset_method``."""
    unbind_s: float = 30.0
    """``drivers/*/unbind``: the nvidia driver waits while anything holds the GPU."""
    probe_s: float = 60.0
    """``drivers_probe``: the nvidia driver boots the GPU's firmware (GSP) while probing."""
    reset_s: float = 90.0
    """``reset``: the kernel waits up to 60 s for a function to answer after a reset."""
    bus_reset_s: float = 120.0
    """``reset_subordinate``: every function below the port is reset and waited for."""
    memory_clear_s: float = 60.0
    """From the end of a secondary bus reset to the firmware's memory clear finishing."""
    nvml_s: float = 30.0
    command_s: float = 120.0
    """Vendor tools: gpu-admin-tools, Fabric Manager's partition tool."""
    scrub_s: float = 1800.0
    """A trusted scrubber writing all of a GPU's memory and reading samples back."""
    kill_grace_s: float = 5.0
    """After SIGKILL, how long to wait for the worker before leaving it to a reaper."""

    def for_attribute(self, relpath: str) -> float:
        name = relpath.rsplit("/", 1)[-1]
        if name == "unbind":
            return self.unbind_s
        if name in ("drivers_probe", "bind"):
            return self.probe_s
        if name == "reset":
            return self.reset_s
        if name == "reset_subordinate":
            return self.bus_reset_s
        return self.write_s


class DeviceRunner(Protocol):
    def call(self, target: str, kwargs: Mapping[str, Any], *, timeout_s: float, what: str) -> Any:
        """Run ``target(**kwargs)``; DeviceError when it fails or outlives ``timeout_s``."""
        ...


class InlineRunner:
    """Calls the target in this process, without a deadline: for read-only tools and for
    tests of logic. The agent never uses it for writes."""

    def call(self, target: str, kwargs: Mapping[str, Any], *, timeout_s: float, what: str) -> Any:
        return resolve_target(target)(**kwargs)


class WorkerRunner:
    """Runs each call in ``python -m hangar.devices.worker``, killed at its deadline."""

    def __init__(
        self,
        *,
        python: str = sys.executable,
        kill_grace_s: float = DeviceDeadlines().kill_grace_s,
        python_path: Sequence[Path] = (),
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.python = python
        self.kill_grace_s = kill_grace_s
        self.environ = dict(os.environ if environ is None else environ)
        if python_path:
            paths = [str(path) for path in python_path]
            if self.environ.get("PYTHONPATH"):
                paths.append(self.environ["PYTHONPATH"])
            self.environ["PYTHONPATH"] = os.pathsep.join(paths)

    def call(self, target: str, kwargs: Mapping[str, Any], *, timeout_s: float, what: str) -> Any:
        request = json.dumps({"target": target, "kwargs": dict(kwargs)}).encode()
        try:
            child = subprocess.Popen(
                [self.python, "-m", WORKER_MODULE],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                close_fds=True,
                env=self.environ,
            )
        except OSError as error:
            raise DeviceError(
                f"{what}: cannot start the device worker: {error.strerror or error}",
                target=target,
                retry=True,
            ) from error
        try:
            stdout, stderr = child.communicate(request, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stuck = not self._kill(child)
            raise DeviceError(
                f"{what}: no answer within {timeout_s:g} s; the worker was killed"
                + (" but is stuck in the kernel" if stuck else ""),
                target=target,
                timed_out=True,
                timeout_s=timeout_s,
                stuck=stuck,
                pid=child.pid,
                retry=False,
            ) from None
        return _answer(target, what, child.returncode, stdout, stderr)

    def _kill(self, child: subprocess.Popen[bytes]) -> bool:
        """SIGKILL the worker's process group; True once it is reaped."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        try:
            child.wait(timeout=self.kill_grace_s)
        except subprocess.TimeoutExpired:
            threading.Thread(target=child.wait, name=f"reap-device-worker-{child.pid}").start()
            return False
        return True


def _answer(target: str, what: str, status: int, stdout: bytes, stderr: bytes) -> Any:
    try:
        answer = json.loads(stdout)
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        detail = stderr.decode(errors="replace").strip()[-_MESSAGE_LIMIT:] or "no output"
        raise DeviceError(
            f"{what}: the device worker failed (status {status}): {detail}",
            target=target,
            exit_status=status,
            retry=False,
        )
    if answer.get("ok"):
        return answer.get("result")
    error = answer.get("error") or {}
    fields = error.get("fields")
    if not isinstance(fields, dict):
        fields = {}
    raise DeviceError(str(error.get("message", f"{what} failed"))[:_MESSAGE_LIMIT], **fields)


class RunnerWriter:
    """A :class:`SysfsWriter` that makes every write through a :class:`DeviceRunner`, with
    the deadline :class:`DeviceDeadlines` gives the attribute."""

    def __init__(
        self,
        runner: DeviceRunner,
        deadlines: DeviceDeadlines | None = None,
        target: str = WRITE_TARGET,
    ) -> None:
        self.runner = runner
        self.deadlines = deadlines or DeviceDeadlines()
        self.target = target

    def write(self, root: Path, relpath: str, data: str) -> None:
        self.runner.call(
            self.target,
            {"root": str(root), "relpath": relpath, "data": data},
            timeout_s=self.deadlines.for_attribute(relpath),
            what=f"writing {data.strip()!r} to {relpath}",
        )


def killable_sysfs(
    root: Path = DEFAULT_SYSFS_ROOT,
    deadlines: DeviceDeadlines | None = None,
    runner: DeviceRunner | None = None,
) -> SysfsRoot:
    """The sysfs the agent should act through: every write in a killable worker."""
    return SysfsRoot(root, writer=RunnerWriter(runner or WorkerRunner(), deadlines))
