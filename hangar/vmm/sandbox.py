"""SandboxDriver: sandbox-tier machines as OCI containers under gVisor's ``runsc`` (or
``runc``, where the operator enables it), behind the same :class:`~hangar.vmm.driver.Driver`
protocol as QEMU.

The process a handle names is a small shell *shim* in a session of its own: it runs
``RUNTIME run`` in the foreground (the container's stdout and stderr go to the console log,
as a VM's serial port does) and, when that returns, appends the container's exit code to
the control log as ``{"type": "exit", "code": N}``, the same line a VM's guest init writes.
So an agent restart loses nothing: the shim outlives it, its exit code lands in a file, and
the next agent adopts the shim by pid and start time. ``runsc run`` ties the sandbox to its
own life (gVisor's ``--attached``), so killing the shim's process group ends the sandbox too;
``RUNTIME kill`` and ``RUNTIME delete --force`` cover what outlives it (runc's containers).

The runtime's own errors go to the VMM log as JSON lines (``--log-format=json``): a
container that never started (an image without its command, a bad bundle) fails the
launch with the runtime's words.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from signal import SIGKILL, SIGTERM

from hangar.clock import Clock, SystemClock
from hangar.errors import Unprocessable, VmmError
from hangar.localhost import short_state_dir
from hangar.model.guest_contract import EXEC_OUTPUT_CAP, RunDir
from hangar.vmm.channels import ChannelLimits
from hangar.vmm.container import CONFIG_NAME, write_bundle
from hangar.vmm.deadline import run_with_deadline
from hangar.vmm.driver import StopOutcome, VmHandle, VmSpec, VmStatus
from hangar.vmm.errors import (
    GuestExecError,
    SnapshotUnusable,
    SuspendFailed,
    SuspendNotSupported,
)
from hangar.vmm.guest_exec import ExecResult, GuestProcess
from hangar.vmm.proc import (
    PROC_ROOT,
    Children,
    ProcessRef,
    adoption_refusal,
    exits_within,
    is_alive,
    read_process,
    tail_text,
)
from hangar.vmm.snapshot import (
    SnapshotFiles,
    SnapshotManifest,
    check_restorable,
    commit_snapshot,
    drop_snapshot,
    has_snapshot,
    read_manifest,
    revoke_snapshot,
    sandbox_identity,
    sandbox_mismatch,
    saved_before,
)

log = logging.getLogger(__name__)

SHIM_MARKER = "hangar-sandbox"
"""``$0`` of every shim: how the agent finds them in /proc."""
MACHINE_TYPE = "sandbox"
STATE_ROOT_BASE = Path("/run/hangar-sandbox")
LAUNCH_POLL_S = 0.02
ERROR_QUOTE_CHARS = 4000
BUNDLE_DIR = RunDir.BUNDLE
ROOTFS_DIR = "rootfs"

# $1 runtime, $2 state root, $3 bundle, $4 container id, $5 console log, $6 control log,
# $7 runtime log, $8 1 to hide /proc/sys/net from the runtime (NETNS_SYSCTL_MASK), $9 the
# Python that writes the console with its bounds (``hangar.vmm.console_pipe``), $10 the bytes
# it keeps, $11 the bytes a second it takes, $12 a checkpoint image folder to restore from
# (empty: run afresh), then the runtime's global flags.
_SHIM = r"""
runtime=$1 root=$2 bundle=$3 id=$4 console=$5 ctl=$6 rlog=$7 mask=$8 py=$9
cmax=${10} crate=${11} image=${12}
shift 12
if [ -n "$image" ]; then
    set -- "$runtime" --root "$root" --log "$rlog" --log-format json "$@" \
        restore --image-path "$image" --bundle "$bundle" "$id"
else
    set -- "$runtime" --root "$root" --log "$rlog" --log-format json "$@" \
        run --bundle "$bundle" "$id"
fi
if [ "$mask" = 1 ]; then
    set -- unshare --mount --propagation private /bin/sh -c '
        mount -t tmpfs -o ro,size=4k,mode=555 hangar-netmask /proc/sys/net || {
            printf "{\"level\":\"error\",\"msg\":\"cannot hide /proc/sys/net\"}\n" >>"$1"
            exit 125
        }
        shift; exec "$@"' hangar-netmask "$rlog" "$@"
fi
# The console writer reads a FIFO (no subshell of this script's command line: the agent finds
# shims by it, and this one alone must match).
fifo=$ctl.pipe
rm -f "$fifo"
mkfifo -m 600 "$fifo" || exit 125
"$py" -m hangar.vmm.console_pipe "$console" "$cmax" "$crate" <"$fifo" &
writer=$!
"$@" >"$fifo" 2>&1 </dev/null
code=$?
wait "$writer"
rm -f "$fifo"
printf '{"type":"exit","code":%d}\n' "$code" >>"$ctl"
"$runtime" --root "$root" delete --force "$id" >/dev/null 2>&1
exit "$code"
"""


NETNS_SYSCTL_MASK = True
"""runsc (2024-07-29, the one packaged) refuses ``--network=sandbox`` in any namespace where
``/proc/sys/net/core/rmem_default`` exists, taking that for the root namespace; kernels since
about 6.11 show that file in every namespace (gVisor issue 10704). So the runtime of a
machine with a namespace runs in a mount namespace of its own with a read-only empty
``/proc/sys/net``: the check looks at the namespace the machine's host end leads to (never
the root one: the OCI spec names it), and nothing else of the runtime reads that folder under
netstack."""


class SandboxRuntime(StrEnum):
    RUNSC = "runsc"
    RUNC = "runc"


class RunscPlatform(StrEnum):
    """How gVisor's sentry intercepts the container's system calls."""

    SYSTRAP = "systrap"
    PTRACE = "ptrace"
    KVM = "kvm"


@dataclass(frozen=True)
class SandboxTimeouts:
    launch_s: float = 30.0
    """From spawning the shim to the container running."""
    command_s: float = 10.0
    """For one ``RUNTIME state|kill|delete|ps`` call."""
    kill_grace_s: float = 10.0
    checkpoint_s: float = 300.0
    """For ``runsc checkpoint`` (it writes the sandbox's memory)."""


CHECKPOINT_FILE = "checkpoint.img"
"""The one file ``runsc checkpoint`` writes into its image folder (this runtime version keeps
the sandbox's state and its memory pages together in it, compressed)."""


def _take_checkpoint_file(image: Path, state: Path) -> None:
    """Move the checkpoint written into ``image`` to the snapshot's partial state file."""
    found = sorted(path.name for path in image.iterdir())
    if found != [CHECKPOINT_FILE]:
        raise SuspendFailed(
            f"the checkpoint in {image} holds {found}, not one {CHECKPOINT_FILE}",
            resumed=False,
        )
    partial = SnapshotFiles(state).state_partial
    os.chmod(image / CHECKPOINT_FILE, 0o600)
    os.replace(image / CHECKPOINT_FILE, partial)


def _first_line(stderr: bytes) -> str:
    text = stderr.decode(errors="replace").strip()
    return text.splitlines()[0][:500] if text else "(no message)"


def state_root_for(machines_dir: Path, runtime: SandboxRuntime) -> Path:
    """The runtime's state folder for the machines under ``machines_dir``: short (it holds
    unix sockets) and distinct per hangar home."""
    return short_state_dir(STATE_ROOT_BASE, machines_dir, f"{runtime.value}-")


def bundle_dir(run_dir: Path) -> Path:
    return run_dir / BUNDLE_DIR


def rootfs_dir(run_dir: Path) -> Path:
    """Where a sandbox machine's root folder is made for each boot."""
    return bundle_dir(run_dir) / ROOTFS_DIR


class SandboxDriver:
    """A :class:`~hangar.vmm.driver.Driver` for specs with a ``container``."""

    def __init__(
        self,
        *,
        binary: Path | str,
        state_root: Path,
        runtime: SandboxRuntime = SandboxRuntime.RUNSC,
        platform: RunscPlatform = RunscPlatform.SYSTRAP,
        clock: Clock | None = None,
        timeouts: SandboxTimeouts | None = None,
        channel_limits: ChannelLimits | None = None,
        python: str = sys.executable,
    ) -> None:
        """``channel_limits``: the console's bounds, a VM's (its size and rate);
        ``python``: the interpreter that runs the console writer."""
        self.runtime = runtime
        self.name = runtime.value
        self.platform = platform
        self._binary = str(binary)
        self._state_root = state_root
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._timeouts = timeouts if timeouts is not None else SandboxTimeouts()
        self._children = Children("shim")
        self._channel_limits = channel_limits if channel_limits is not None else ChannelLimits()
        self._python = python

    # launching
    def global_flags(self, spec: VmSpec) -> list[str]:
        """The runtime's flags for this spec (after ``--root`` and ``--log``)."""
        if self.runtime is SandboxRuntime.RUNC:
            return []
        # With a NIC, gVisor's own network stack (netstack) takes the namespace's eth0, its
        # addresses and routes: the container's sockets never reach the host's kernel. A
        # checkpoint drops its open connections (as a VM's peers lose theirs while it is
        # suspended) instead of refusing to save them.
        flags = ["--network=none"]
        if spec.nic is not None:
            flags = ["--network=sandbox", "--net-disconnect-ok"]
        flags.append(f"--platform={self.platform.value}")
        container = spec.container
        if container is not None and container.gpu:
            flags.append("--nvproxy")
        return flags

    def prepare(self, spec: VmSpec, restore_from: Path | None = None) -> list[str]:
        """The shim's command line for ``spec``; ``restore_from``: a checkpoint image folder
        to restore the container from instead of running it afresh."""
        container = spec.container
        if container is None:
            raise Unprocessable(
                f"machine {spec.machine_id}: the {self.name} driver runs containers; this spec "
                "boots a VM",
                field="tier",
            )
        if shutil.which(self._binary) is None:
            raise VmmError(
                f"the sandbox runtime {self._binary!r} is not installed (make runsc)",
                machine_id=spec.machine_id,
                binary=self._binary,
            )
        if not container.rootfs.is_dir():
            raise VmmError(
                f"machine {spec.machine_id}: root folder {container.rootfs} is missing",
                machine_id=spec.machine_id,
                field="rootfs",
            )
        netns = spec.nic.netns if spec.nic is not None else None
        if netns is not None and not netns.exists():
            raise VmmError(
                f"machine {spec.machine_id}: its network namespace {netns} is missing",
                machine_id=spec.machine_id,
                field="nic",
                retryable=True,
            )
        for mount in container.mounts:
            if not mount.source.exists():
                raise VmmError(
                    f"machine {spec.machine_id}: {mount.source} (for {mount.destination}) "
                    "is missing",
                    machine_id=spec.machine_id,
                    field="mounts",
                )
        return [
            "/bin/sh",
            "-c",
            _SHIM,
            SHIM_MARKER,
            self._binary,
            str(self._state_root),
            str(bundle_dir(spec.run_dir)),
            spec.machine_id,
            str(spec.console_log),
            str(spec.control_log),
            str(spec.vmm_log),
            "1" if self._masks_net_sysctls(spec) else "0",
            self._python,
            str(self._channel_limits.console_max_bytes),
            str(self._channel_limits.rate_bytes),
            "" if restore_from is None else str(restore_from),
            *self.global_flags(spec),
        ]

    def _masks_net_sysctls(self, spec: VmSpec) -> bool:
        return (
            NETNS_SYSCTL_MASK
            and self.runtime is SandboxRuntime.RUNSC
            and spec.nic is not None
            and spec.nic.netns is not None
        )

    async def launch(self, spec: VmSpec) -> VmHandle:
        """Run the container, or restore it from ``spec.incoming_snapshot`` (a snapshot
        that does not fit is dropped and :class:`SnapshotUnusable` raised: boot cold)."""
        state = spec.incoming_snapshot
        argv = self.prepare(spec)
        assert spec.container is not None
        write_bundle(
            bundle_dir(spec.run_dir),
            spec.container,
            cpus=spec.cpus,
            memory_mb=spec.memory_mb,
            netns=spec.nic.netns if spec.nic is not None else None,
        )
        if state is not None:
            image = await asyncio.to_thread(self._restore_image, spec, state)
            argv = self.prepare(spec, restore_from=image)
            # From here the container may run on from its root folder: the snapshot must
            # never be restored again, whatever happens (its image stays linked for runsc).
            await asyncio.to_thread(revoke_snapshot, state)
        self._state_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        # What a launch cut short left behind under this id.
        await self._runtime_call(["delete", "--force", spec.machine_id], check=False)
        for path in (spec.console_log, spec.control_log, spec.vmm_log):
            path.parent.mkdir(parents=True, exist_ok=True)
        spec.control_log.unlink(missing_ok=True)
        spec.vmm_log.write_bytes(b"")
        child, start_time = self._children.spawn(argv, stderr=None, machine_id=spec.machine_id)
        handle = VmHandle.of(
            spec,
            driver=self.name,
            pid=child.pid,
            start_time=start_time,
            accel=self.platform.value if self.runtime is SandboxRuntime.RUNSC else "none",
            machine_type=MACHINE_TYPE,
            spec=spec,
        )
        try:
            await self._wait_until_running(handle, child)
        except BaseException as error:
            with contextlib.suppress(VmmError):
                await self.kill(handle)
            if state is not None:
                await asyncio.to_thread(drop_snapshot, state)
                if isinstance(error, VmmError):
                    raise SnapshotUnusable(
                        f"{self.name} could not restore machine {spec.machine_id}: {error}",
                        reason="rejected",
                        path=str(state),
                        machine_id=spec.machine_id,
                    ) from error
            raise
        if state is not None:
            await asyncio.to_thread(drop_snapshot, state)
        if child.poll() is None:  # a container that has already ended says so itself
            with spec.control_log.open("a") as ctl:
                ctl.write(json.dumps({"type": "ready"}) + "\n")
        log.info(
            "machine %s: %s sandbox running (shim pid %d)", spec.machine_id, self.name, child.pid
        )
        return handle

    async def _wait_until_running(self, handle: VmHandle, child: subprocess.Popen[bytes]) -> None:
        deadline = self._clock.monotonic() + self._timeouts.launch_s
        while True:
            if child.poll() is not None:
                failure = runtime_error(handle.vmm_log)
                if failure is not None:
                    raise VmmError(
                        f"{self.name} could not start machine {handle.machine_id}: {failure}",
                        machine_id=handle.machine_id,
                        exit_status=child.returncode,
                        retryable=False,
                    )
                return  # it ran, and has already ended: its exit is in the control log
            state = await self._container_state(handle.machine_id)
            if state in ("running", "paused"):
                return
            # "stopped": it ended, or never started (runc says so before its error): the
            # shim's end, next time round, tells which.
            if self._clock.monotonic() >= deadline:
                raise VmmError(
                    f"the {self.name} container of machine {handle.machine_id} was not running "
                    f"within {self._timeouts.launch_s:g} s",
                    machine_id=handle.machine_id,
                    stderr=tail_text(handle.vmm_log, ERROR_QUOTE_CHARS),
                )
            await self._clock.sleep(LAUNCH_POLL_S)

    # runtime calls
    async def _runtime_call(
        self, args: Sequence[str], *, check: bool = True, timeout_s: float | None = None
    ) -> tuple[int, bytes, bytes]:
        process = await asyncio.create_subprocess_exec(
            self._binary,
            "--root",
            str(self._state_root),
            *args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            limit = self._timeouts.command_s if timeout_s is None else timeout_s
            out, err = await run_with_deadline(self._clock, limit, process.communicate())
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise VmmError(
                f"{self.name} {' '.join(args[:1])} did not answer within {limit:g} s",
                retryable=True,
            ) from None
        code = process.returncode if process.returncode is not None else -1
        if check and code != 0:
            raise VmmError(
                f"{self.name} {' '.join(args[:1])} failed: {err.decode(errors='replace')[-500:]}",
                exit_status=code,
            )
        return code, out, err

    async def _container_state(self, container_id: str) -> str | None:
        code, out, _ = await self._runtime_call(["state", container_id], check=False)
        if code != 0:
            return None
        try:
            value = json.loads(out)
        except json.JSONDecodeError:
            return None
        status = value.get("status") if isinstance(value, dict) else None
        return status if isinstance(status, str) else None

    # signals and stopping
    async def signal(self, handle: VmHandle, signum: int) -> None:
        await self._runtime_call(["kill", handle.machine_id, str(signum)])

    async def stop(
        self, handle: VmHandle, timeout_s: float, clock: Clock, signum: int = SIGTERM
    ) -> StopOutcome:
        process = ProcessRef.open(handle.pid, handle.start_time)
        if process is None:
            return StopOutcome.NOT_RUNNING
        with process:
            deadline = clock.monotonic() + timeout_s
            code, _, err = await self._runtime_call(
                ["kill", handle.machine_id, str(signum)], check=False
            )
            if code != 0:
                log.warning("machine %s: %s kill: %s", handle.machine_id, self.name, err[-300:])
            if await _exits_soon(process, clock, deadline - clock.monotonic()):
                return StopOutcome.GUEST_EXITED
            log.info(
                "machine %s: still running after %s s, killing it", handle.machine_id, timeout_s
            )
            await self._kill(handle, process, clock)
            return StopOutcome.KILLED

    async def kill(self, handle: VmHandle) -> None:
        process = ProcessRef.open(handle.pid, handle.start_time)
        if process is None:
            # The shim is gone; what it ran may not be (runc's containers outlive it).
            await self._runtime_call(["kill", "--all", handle.machine_id, "KILL"], check=False)
            await self._runtime_call(["delete", "--force", handle.machine_id], check=False)
            return
        with process:
            await self._kill(handle, process, self._clock)

    async def _kill(self, handle: VmHandle, process: ProcessRef, clock: Clock) -> None:
        """The container's processes, then the shim's group; return once the shim is gone."""
        await self._runtime_call(["kill", "--all", handle.machine_id, "KILL"], check=False)
        if not await exits_within(process, clock, self._timeouts.kill_grace_s):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(handle.pid, SIGKILL)
            process.send_signal(SIGKILL)
            if not await exits_within(process, clock, self._timeouts.kill_grace_s):
                raise VmmError(
                    f"the sandbox shim pid {handle.pid} is still running after SIGKILL",
                    machine_id=handle.machine_id,
                    pid=handle.pid,
                )
        await self._runtime_call(["delete", "--force", handle.machine_id], check=False)

    # state
    async def status(self, handle: VmHandle) -> VmStatus:
        from hangar.vmm.control import read_control_events, summarise_control_events

        report = summarise_control_events(read_control_events(handle.control_log))
        if self.is_running(handle):
            return VmStatus(
                state="running",
                guest_ready=report.ready,
                exit_code=report.exit_code,
                error=report.error,
                vm_state=await self._container_state(handle.machine_id),
            )
        shim_status = await self._children.exit_status(handle.pid, handle.start_time)
        error = report.error
        if error is None and report.exit_code is None:
            detail = "" if shim_status is None else f" (status {shim_status})"
            error = f"the sandbox ended before its exit code was recorded{detail}"
            failure = runtime_error(handle.vmm_log)
            if failure is not None:
                error += f": {failure}"
        return VmStatus(
            state="exited",
            guest_ready=report.ready,
            exit_code=report.exit_code,
            error=error,
            vmm_exit_status=shim_status,
        )

    def is_running(self, handle: VmHandle) -> bool:
        return is_alive(handle.pid, handle.start_time)

    async def adopt(self, handle: VmHandle) -> bool:
        refusal = await self._adoption_refusal(handle)
        if refusal is not None:
            log.warning(
                "machine %s: not adopting shim pid %d: %s", handle.machine_id, handle.pid, refusal
            )
            return False
        return True

    async def _adoption_refusal(self, handle: VmHandle) -> str | None:
        if handle.driver != self.name:
            return f"the handle belongs to driver {handle.driver!r}"
        refusal = adoption_refusal(
            handle.pid,
            handle.start_time,
            lambda cmdline: shim_machine(cmdline) == handle.machine_id,
            "this machine's sandbox shim",
        )
        if refusal is not None:
            return refusal
        if await self._container_state(handle.machine_id) is None:
            return f"{self.name} does not know its container"
        return None

    async def suspend(self, handle: VmHandle, snapshot_path: Path) -> SnapshotManifest:
        """``runsc checkpoint``: the sandbox (its kernel state and memory) saved into the
        snapshot at ``snapshot_path``, after which the container ends. Its open connections
        are dropped. A GPU part cannot be saved (refused before anything is done)."""
        spec = handle.spec
        if spec is None or spec.container is None or self.runtime is not SandboxRuntime.RUNSC:
            raise SuspendNotSupported(
                f"machine {handle.machine_id}: only gVisor's sandboxes can be suspended",
                field="tier",
                machine_id=handle.machine_id,
            )
        if spec.container.gpu:
            raise SuspendNotSupported(
                f"machine {handle.machine_id} holds a GPU part, whose state cannot be saved",
                field="config.guest",
                machine_id=handle.machine_id,
            )
        process = ProcessRef.open(handle.pid, handle.start_time)
        if process is None:
            return saved_before(snapshot_path, handle.machine_id)
        with process:
            if has_snapshot(snapshot_path):
                # An earlier run committed the snapshot; the container is on its way out.
                await self._kill(handle, process, self._clock)
                return read_manifest(snapshot_path)
            drop_snapshot(snapshot_path)
            image = SnapshotFiles(snapshot_path).checkpoint_dir
            shutil.rmtree(image, ignore_errors=True)
            image.mkdir(mode=0o700, parents=True)
            try:
                code, _, err = await self._runtime_call(
                    ["checkpoint", "--image-path", str(image), handle.machine_id],
                    check=False,
                    timeout_s=self._timeouts.checkpoint_s,
                )
                if code != 0:
                    resumed = not await exits_within(process, self._clock, LAUNCH_POLL_S * 10)
                    raise SuspendFailed(
                        f"{self.name} could not checkpoint machine {handle.machine_id}: "
                        f"{_first_line(err)}",
                        resumed=resumed,
                        machine_id=handle.machine_id,
                    )
                await asyncio.to_thread(_take_checkpoint_file, image, snapshot_path)
            finally:
                shutil.rmtree(image, ignore_errors=True)
            identity = await asyncio.to_thread(
                sandbox_identity, self._binary, bundle_dir(spec.run_dir) / CONFIG_NAME
            )
            manifest = await asyncio.to_thread(
                commit_snapshot,
                snapshot_path,
                machine_id=handle.machine_id,
                now=self._clock.now(),
                sandbox=identity,
            )
            log.info(
                "machine %s: sandbox suspended into %s (%d bytes)",
                handle.machine_id,
                snapshot_path,
                manifest.state_size,
            )
            if not await exits_within(process, self._clock, self._timeouts.kill_grace_s):
                await self._kill(handle, process, self._clock)
        # The shim recorded the checkpointed container's end as an exit: it was not one.
        handle.control_log.unlink(missing_ok=True)
        return manifest

    def _restore_image(self, spec: VmSpec, state: Path) -> Path:
        """The checkpoint image folder ``runsc restore`` reads, once the snapshot at
        ``state`` is known to fit ``spec`` (whose bundle is written) and to be intact."""
        try:
            manifest = read_manifest(state)
            now = sandbox_identity(self._binary, bundle_dir(spec.run_dir) / CONFIG_NAME)
            mismatch = sandbox_mismatch(manifest.sandbox, now)
            check_restorable(state, manifest, mismatch, spec.machine_id)
        except SnapshotUnusable:
            drop_snapshot(state)
            raise
        image = SnapshotFiles(state).checkpoint_dir
        shutil.rmtree(image, ignore_errors=True)
        image.mkdir(mode=0o700, parents=True)
        os.link(state, image / CHECKPOINT_FILE)
        return image

    async def exec(
        self, handle: VmHandle, argv: Sequence[str], *, stdin: bytes = b"", timeout_s: float
    ) -> ExecResult:
        if not argv:
            raise GuestExecError("exec needs a command", retryable=False, field="command")
        process = await asyncio.create_subprocess_exec(
            self._binary,
            "--root",
            str(self._state_root),
            "exec",
            handle.machine_id,
            *argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        timed_out = False
        try:
            out, err = await run_with_deadline(self._clock, timeout_s, process.communicate(stdin))
        except TimeoutError:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, SIGKILL)
            out, err = await process.communicate()
        code = process.returncode if process.returncode is not None else -1
        if code < 0:
            code = 128 - code
        return ExecResult(
            exit_code=137 if timed_out else code,
            stdout=out[:EXEC_OUTPUT_CAP],
            stderr=err[:EXEC_OUTPUT_CAP],
            stdout_truncated=len(out) > EXEC_OUTPUT_CAP,
            stderr_truncated=len(err) > EXEC_OUTPUT_CAP,
            timed_out=timed_out,
        )

    async def processes(self, handle: VmHandle) -> list[GuestProcess]:
        """The container's processes as the runtime's ``ps`` table lists them (pids as the
        container sees them under runsc; memory and CPU time are not reported)."""
        _, out, _ = await self._runtime_call(["ps", handle.machine_id])
        return parse_ps_table(out.decode(errors="replace"))


def parse_ps_table(text: str) -> list[GuestProcess]:
    """``UID PID PPID C ... CMD`` rows (the command last, possibly with blanks)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    header = lines[0].split()
    if "PID" not in header or "CMD" not in header or header[-1] != "CMD":
        raise VmmError(f"unexpected ps output: {lines[0][:200]!r}")
    found = []
    for line in lines[1:]:
        fields = line.split(None, len(header) - 1)
        if len(fields) < len(header):
            continue
        row = dict(zip(header, fields, strict=True))
        command = row["CMD"]
        found.append(
            GuestProcess(
                pid=int(row["PID"]) if row["PID"].isdigit() else 0,
                ppid=int(row.get("PPID", "0")) if row.get("PPID", "").isdigit() else 0,
                uid=int(row["UID"]) if row.get("UID", "").isdigit() else 0,
                user=row.get("UID", ""),
                state="",
                command=command.split()[0] if command.split() else command,
                argv=command.split(),
                directory="",
                rss_bytes=0,
                cpu_time_s=0.0,
                started_after_boot_s=0.0,
            )
        )
    return found


def shim_machine(cmdline: Sequence[str]) -> str | None:
    """The machine id a shim's command line runs, or None for any other process."""
    if len(cmdline) > 7 and cmdline[2] == _SHIM and cmdline[3] == SHIM_MARKER:
        return cmdline[7]
    return None


def find_shims(machines_dir: Path, proc_root: Path = PROC_ROOT) -> dict[int, str]:
    """Live shims of machines whose bundle is under ``machines_dir``: pid -> machine id."""
    prefix = str(machines_dir.resolve()) + os.sep
    found: dict[int, str] = {}
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        info = read_process(int(entry.name), proc_root)
        if info is None or info.exited:
            continue
        machine_id = shim_machine(info.cmdline)
        if machine_id is not None and info.cmdline[6].startswith(prefix):
            found[info.pid] = machine_id
    return found


def kill_shim(pid: int) -> None:
    """SIGKILL a shim's whole group (with ``runsc run``, whose sandbox dies with it)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


async def _exits_soon(process: ProcessRef, clock: Clock, seconds: float) -> bool:
    """Like ``exits_within``, for a deadline that may have passed already."""
    if seconds <= 0:
        return process.has_exited()
    return await exits_within(process, clock, seconds)


def runtime_error(runtime_log: Path) -> str | None:
    """The last error the runtime logged (its JSON log lines), if any."""
    message = None
    for line in tail_text(runtime_log, ERROR_QUOTE_CHARS).splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
            message = str(entry.get("msg", ""))
    return message


__all__ = [
    "BUNDLE_DIR",
    "CONFIG_NAME",
    "RunscPlatform",
    "SandboxDriver",
    "SandboxRuntime",
    "SandboxTimeouts",
    "bundle_dir",
    "find_shims",
    "kill_shim",
    "parse_ps_table",
    "rootfs_dir",
    "runtime_error",
    "shim_machine",
    "state_root_for",
]
