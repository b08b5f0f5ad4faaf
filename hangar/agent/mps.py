"""One CUDA MPS control daemon per shared GPU, run and supervised by the agent.

Time shares of a GPU (``guest.gpu_share``) run as clients of that GPU's MPS server: the
control daemon (``nvidia-cuda-mps-control -f``, in the foreground so the agent owns it) is
started with the GPU as its only visible device and a pipe folder of its own; each sandbox
holding a share of the GPU gets that folder bound in, and its limits (active thread
percentage, pinned device memory) in its environment (``hangar.agent.slices``).

The daemon runs in a session of its own, so it outlives an agent restart; its pid and
start time are kept in ``daemon.json`` beside the pipes, and the next agent finds it there.
The control binary is the one seam: tests run a stand-in script that makes the same pipe and
answers ``quit`` as the real one does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel

from hangar.clock import Clock, SystemClock
from hangar.errors import DeviceError
from hangar.vmm.proc import ProcessRef, read_process

log = logging.getLogger(__name__)

MPS_CONTROL = "nvidia-cuda-mps-control"
CONTROL_PIPE = "control"
"""The FIFO the control daemon makes in its pipe folder once it listens."""
STATE_FILE = "daemon.json"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.02


class DaemonRecord(BaseModel):
    pid: int
    start_time: int
    gpu_uuid: str


def _slot(bdf: str) -> str:
    return bdf.replace(":", "_")


class MpsSupervisor:
    """The MPS control daemons of this host's shared GPUs, under ``root`` (one folder a GPU)."""

    def __init__(
        self,
        root: Path,
        *,
        control: Sequence[str] = (MPS_CONTROL,),
        clock: Clock | None = None,
    ) -> None:
        self.root = root
        self._control = list(control)
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def folder(self, bdf: str) -> Path:
        return self.root / _slot(bdf)

    def pipe_dir(self, bdf: str) -> Path:
        """The pipes a share's sandbox binds in (``CUDA_MPS_PIPE_DIRECTORY``)."""
        return self.folder(bdf) / "pipe"

    def log_dir(self, bdf: str) -> Path:
        return self.folder(bdf) / "log"

    def _env(self, bdf: str, gpu_uuid: str) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CUDA_VISIBLE_DEVICES": gpu_uuid,
            "CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir(bdf)),
            "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir(bdf)),
        }

    def recorded(self, bdf: str) -> DaemonRecord | None:
        """The daemon last started for the GPU, running or not."""
        return self._record(bdf)

    def _record(self, bdf: str) -> DaemonRecord | None:
        try:
            return DaemonRecord.model_validate_json((self.folder(bdf) / STATE_FILE).read_text())
        except (OSError, ValueError):
            return None

    def daemon(self, bdf: str) -> DaemonRecord | None:
        """The GPU's running control daemon, if there is one."""
        record = self._record(bdf)
        if record is None:
            return None
        info = read_process(record.pid)
        if info is None or info.exited or info.start_time != record.start_time:
            return None
        return record

    def _lock(self, bdf: str) -> asyncio.Lock:
        return self._locks.setdefault(bdf, asyncio.Lock())

    async def ensure(self, bdf: str, gpu_uuid: str) -> Path:
        """The GPU's daemon running (started if it is not); its pipe folder."""
        async with self._lock(bdf):
            record = self.daemon(bdf)
            pipe = self.pipe_dir(bdf)
            if (
                record is not None
                and record.gpu_uuid == gpu_uuid
                and (pipe / CONTROL_PIPE).exists()
            ):
                return pipe
            if record is not None:
                await self._end(bdf, record)
            return await self._start(bdf, gpu_uuid)

    async def _start(self, bdf: str, gpu_uuid: str) -> Path:
        pipe, logs = self.pipe_dir(bdf), self.log_dir(bdf)
        for folder in (pipe, logs):
            folder.mkdir(parents=True, exist_ok=True, mode=0o755)
        (pipe / CONTROL_PIPE).unlink(missing_ok=True)
        try:
            child = subprocess.Popen(
                [*self._control, "-f"],
                env=self._env(bdf, gpu_uuid),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=(logs / "control.stderr").open("ab"),
                start_new_session=True,
                close_fds=True,
            )
        except OSError as error:
            raise DeviceError(
                f"cannot start the MPS control daemon of GPU {bdf}: {error.strerror or error}",
                bdf=bdf,
                retryable=False,
            ) from error
        self._children[bdf] = child
        info = read_process(child.pid)
        assert info is not None  # not reaped yet
        record = DaemonRecord(pid=child.pid, start_time=info.start_time, gpu_uuid=gpu_uuid)
        partial = self.folder(bdf) / (STATE_FILE + ".partial")
        partial.write_text(record.model_dump_json())
        partial.rename(self.folder(bdf) / STATE_FILE)
        deadline = self._clock.monotonic() + START_TIMEOUT_S
        while not (pipe / CONTROL_PIPE).exists():
            if child.poll() is not None or self._clock.monotonic() >= deadline:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                await asyncio.to_thread(child.wait)
                (self.folder(bdf) / STATE_FILE).unlink(missing_ok=True)
                raise DeviceError(
                    f"the MPS control daemon of GPU {bdf} did not start "
                    f"(status {child.returncode})",
                    bdf=bdf,
                    retryable=True,
                )
            await self._clock.sleep(POLL_S)
        log.info("GPU %s: MPS control daemon pid %d for %s", bdf, child.pid, gpu_uuid)
        return pipe

    async def stop(self, bdf: str) -> None:
        """Quit the GPU's daemon (its ``quit`` command, then signals); idempotent."""
        async with self._lock(bdf):
            record = self.daemon(bdf)
            if record is not None:
                await self._end(bdf, record)
            (self.folder(bdf) / STATE_FILE).unlink(missing_ok=True)

    async def _end(self, bdf: str, record: DaemonRecord) -> None:
        process = ProcessRef.open(record.pid, record.start_time)
        if process is None:
            return
        with process:
            quit_cmd = await asyncio.create_subprocess_exec(
                *self._control,
                env=self._env(bdf, record.gpu_uuid),
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            with contextlib.suppress(OSError):
                await quit_cmd.communicate(b"quit\n")
            for signum in (None, signal.SIGTERM, signal.SIGKILL):
                if signum is not None:
                    process.send_signal(signum)
                if await self._exited(process):
                    break
            else:
                raise DeviceError(
                    f"the MPS control daemon of GPU {bdf} (pid {record.pid}) does not end",
                    bdf=bdf,
                    retryable=True,
                )
        child = self._children.pop(bdf, None)
        if child is not None:
            await asyncio.to_thread(child.wait)
        log.info("GPU %s: MPS control daemon pid %d stopped", bdf, record.pid)

    async def _exited(self, process: ProcessRef) -> bool:
        deadline = self._clock.monotonic() + STOP_TIMEOUT_S / 3
        while self._clock.monotonic() < deadline:
            if process.has_exited():
                return True
            await self._clock.sleep(POLL_S)
        return process.has_exited()

    async def supervise(self, shared_now: Callable[[], Mapping[str, str]]) -> None:
        """Make the daemons match ``shared_now()`` (bdf -> GPU UUID of every GPU that shares
        hold, asked anew before each change): a daemon that died under its shares is started
        again, one no share needs is stopped."""
        for bdf, uuid in shared_now().items():
            if self.daemon(bdf) is None:
                log.warning("GPU %s: MPS control daemon gone under its shares; restarting", bdf)
                await self.ensure(bdf, uuid)
        if not self.root.is_dir():
            return
        for folder in sorted(self.root.iterdir()):
            bdf = _bdf_of(folder.name)
            async with self._lock(bdf):
                record = self._record(bdf)
                if record is None or bdf in shared_now():
                    continue
                if self.daemon(bdf) is not None:
                    await self._end(bdf, record)
                (folder / STATE_FILE).unlink(missing_ok=True)


def _bdf_of(slot: str) -> str:
    return slot.replace("_", ":")
