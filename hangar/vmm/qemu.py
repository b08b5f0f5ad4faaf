"""QemuDriver: machines as QEMU processes that outlive the agent that started them.

QEMU runs in its own session with no inherited stdio, so an agent crash or restart leaves
it running; the handle (pid + start time) lets the next agent :meth:`~QemuDriver.adopt` it.
The guest's console and control channels are read by the driver's
:class:`~hangar.vmm.channels.ChannelPump` (bounded in size and rate, off the event loop);
launch and adopt attach them.
A QEMU this instance launched is reaped by a waiter thread as soon as it exits; one that
was adopted is someone else's child, and its exit shows through a pidfd, /proc and the
guest's control log.

Suspend is QEMU's migration into a file (:mod:`hangar.vmm.migration`), committed as a
snapshot (:mod:`hangar.vmm.snapshot`); restore launches the same command line with
``-incoming`` and continues the VM once the snapshot is loaded and checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from signal import SIGKILL, SIGTERM
from typing import Any

from hangar.clock import Clock, SystemClock
from hangar.errors import VmmError
from hangar.vmm.accel import AccelChoice, choose_accel, kvm_choice, tcg_choice
from hangar.vmm.channels import ChannelLimits, ChannelPump, connect_unix
from hangar.vmm.control import read_control_events, summarise_control_events
from hangar.vmm.driver import StopOutcome, VmHandle, VmSpec, VmStatus
from hangar.vmm.errors import (
    GuestExecError,
    QmpError,
    SignalNotDelivered,
    SnapshotUnusable,
    SuspendFailed,
    SuspendNotSupported,
)
from hangar.vmm.gpu_topology import launch_timeout_s, unpin_time_s
from hangar.vmm.guest_exec import (
    ExecResult,
    GuestProcess,
    exec_in_guest,
    list_guest_processes,
    tell_guest_resumed,
)
from hangar.vmm.migration import (
    PAUSED_STATES,
    MigrationFailed,
    cancel_active_migration,
    save_to_file,
    wait_incoming_loaded,
)
from hangar.vmm.proc import (
    Children,
    ProcessRef,
    adoption_refusal,
    exits_within,
    is_alive,
    tail_text,
)
from hangar.vmm.qemu_argv import (
    HUGEPAGES_DIR,
    QEMU_BINARY,
    check_spec_files,
    machine_process_name,
    qemu_argv,
)
from hangar.vmm.qmp import qmp_execute, query_status
from hangar.vmm.signal_port import send_guest_signal
from hangar.vmm.snapshot import (
    SnapshotManifest,
    check_restorable,
    commit_snapshot,
    create_partial_state,
    drop_snapshot,
    has_snapshot,
    identity_mismatch,
    read_manifest,
    revoke_snapshot,
    saved_before,
    vm_identity,
)

log = logging.getLogger(__name__)

# QMP run states in which the guest cannot go on by itself.
FAILED_VM_STATES = frozenset({"internal-error", "guest-panicked", "io-error", "shutdown"})
VMM_LOG_QUOTE_CHARS = 4000
LAUNCH_POLL_S = 0.01
DRAIN_TIMEOUT_S = 10.0
"""How long the exit waits for what the guest sent last to be read into its control log."""


@dataclass(frozen=True)
class QemuTimeouts:
    launch_s: float = 60.0
    """From spawning QEMU to its monitor answering (VFIO and preallocated memory take time)."""
    qmp_s: float = 10.0
    signal_s: float = 5.0
    """For QEMU to take a signal line, which it does once the guest reads its port."""
    quit_grace_s: float = 10.0
    kill_grace_s: float = 30.0
    """A SIGKILLed QEMU with VFIO devices can take seconds to release them."""
    migrate_base_s: float = 60.0
    migrate_per_gib_s: float = 60.0
    """Saving or loading a snapshot may take migrate_base_s + this much per GiB of memory."""
    resume_notice_s: float = 5.0
    """For the restored guest to take its clock and note the resume (it goes on regardless)."""

    def migrate_s(self, memory_mb: int) -> float:
        return self.migrate_base_s + self.migrate_per_gib_s * memory_mb / 1024


# QEMU's words when an incoming migration stream does not fit or does not load.
_REJECTED_STREAM_WORDS = ("migration", "loading state", "savevm", "ramblock")
MIGRATION_MAX_BANDWIDTH = 1 << 40
"""Bytes a second: the VM is stopped while it is saved, so nothing is gained by throttling."""


class QemuDriver:
    name = "qemu"

    def __init__(
        self,
        *,
        accel: AccelChoice | None = None,
        binary: str = QEMU_BINARY,
        clock: Clock | None = None,
        timeouts: QemuTimeouts | None = None,
        hugepages_dir: Path = HUGEPAGES_DIR,
        channel_limits: ChannelLimits | None = None,
        migration_bandwidth: int = MIGRATION_MAX_BANDWIDTH,
    ) -> None:
        self.accel = accel if accel is not None else choose_accel()
        self.channels = ChannelPump(channel_limits)
        self._binary = binary
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._timeouts = timeouts if timeouts is not None else QemuTimeouts()
        self._hugepages_dir = hugepages_dir
        self._migration_bandwidth = migration_bandwidth
        self._children = Children("qemu")

    def prepare(self, spec: VmSpec) -> list[str]:
        check_spec_files(spec, hugepages_dir=self._hugepages_dir)
        return qemu_argv(spec, self.accel, binary=self._binary, hugepages_dir=self._hugepages_dir)

    async def launch(self, spec: VmSpec) -> VmHandle:
        try:
            if spec.incoming_snapshot is not None:
                return await self._restore(spec, spec.incoming_snapshot)
            return await self._boot(spec)
        finally:
            # QEMU read the volumes' passphrases while starting; they must not outlive that.
            _remove_volume_key_files(spec)

    async def _boot(self, spec: VmSpec) -> VmHandle:
        argv = self.prepare(spec)
        _clear_run_files(spec)
        handle, child = self._start(spec, argv)
        try:
            deadline = self._clock.monotonic() + self._launch_s(spec)
            await self._attach_channels(handle, child, argv, deadline)
            await self._wait_until_answering(
                handle, child, argv, max(0.0, deadline - self._clock.monotonic())
            )
        except BaseException:
            with contextlib.suppress(VmmError):
                await self.kill(handle)
            raise
        log.info(
            "machine %s: QEMU pid %d running (accel=%s machine=%s)",
            spec.machine_id,
            child.pid,
            handle.accel,
            handle.machine_type,
        )
        return handle

    def _start(self, spec: VmSpec, argv: list[str]) -> tuple[VmHandle, subprocess.Popen[bytes]]:
        child, start_time = self._children.spawn(
            argv, stderr=spec.vmm_log, machine_id=spec.machine_id
        )
        handle = VmHandle.of(
            spec,
            driver=self.name,
            pid=child.pid,
            start_time=start_time,
            console_socket=spec.console_socket,
            control_socket=spec.control_socket,
            accel=self.accel.accel,
            machine_type=argv[argv.index("-machine") + 1],
            cpu_model=self.accel.cpu_model,
            exec_socket=spec.exec_socket,
            spec=spec.model_copy(update={"incoming_snapshot": None}),
        )
        return handle, child

    async def _restore(self, spec: VmSpec, state: Path) -> VmHandle:
        """Launch ``spec`` from the snapshot at ``state``; see :meth:`Driver.launch`."""
        try:
            manifest = read_manifest(state)
            argv = self._prepare_restore(spec, state)
        except SnapshotUnusable:
            await asyncio.to_thread(drop_snapshot, state)
            raise
        _clear_run_files(spec, keep_control_log=True)
        handle, child = self._start(spec, argv)
        # Checked while QEMU starts and loads the same file; the VM runs only if it passes.
        verified = asyncio.ensure_future(
            asyncio.to_thread(self._verify_snapshot, spec, state, manifest)
        )
        try:
            await self._load_snapshot(handle, child, argv, spec)
            await verified
            # From here the guest runs on and its disk moves away from the snapshot: it
            # must never be restored again.
            revoke_snapshot(state)
            await qmp_execute(
                handle.qmp_socket, "cont", clock=self._clock, timeout_s=self._timeouts.qmp_s
            )
        except BaseException as error:
            with contextlib.suppress(VmmError):
                await self.kill(handle)
            problem = await _exception_of(verified)
            if isinstance(error, VmmError) and isinstance(problem, SnapshotUnusable):
                error = problem  # what made QEMU fail, or what it would have run
            if isinstance(error, SnapshotUnusable):
                await asyncio.to_thread(drop_snapshot, state)
            raise error
        log.info("machine %s: QEMU pid %d restored from %s", spec.machine_id, child.pid, state)
        await asyncio.to_thread(drop_snapshot, state)
        try:
            await tell_guest_resumed(
                handle, clock=self._clock, timeout_s=self._timeouts.resume_notice_s
            )
        except GuestExecError as error:
            log.warning("machine %s: the guest did not take the resume: %s", spec.machine_id, error)
        return handle

    async def _attach_channels(
        self, handle: VmHandle, child: subprocess.Popen[bytes], argv: list[str], deadline: float
    ) -> None:
        """Take the console (QEMU waits for it before it goes on) and the control port."""
        for kind, sock_path, log_path in (
            ("console", handle.console_socket, handle.console_log),
            ("control", handle.control_socket, handle.control_log),
        ):
            if sock_path is None:
                continue
            while True:
                if child.returncode is not None:
                    return  # _wait_until_answering reports how it ended
                if sock_path.exists():
                    try:
                        self.channels.attach(
                            handle.machine_id, kind, connect_unix(sock_path), log_path
                        )
                        break
                    except OSError:
                        pass
                if self._clock.monotonic() > deadline:
                    raise VmmError(
                        f"QEMU for machine {handle.machine_id} did not open its {kind} channel",
                        machine_id=handle.machine_id,
                        stderr=tail_text(handle.vmm_log, VMM_LOG_QUOTE_CHARS),
                        argv=argv,
                    )
                await self._clock.sleep(LAUNCH_POLL_S)

    def _reattach_channels(self, handle: VmHandle) -> None:
        """An adopted VM's channels, read again by this driver."""
        for kind, sock_path, log_path in (
            ("console", handle.console_socket, handle.console_log),
            ("control", handle.control_socket, handle.control_log),
        ):
            if sock_path is None or self.channels.attached(handle.machine_id, kind):
                continue
            try:
                self.channels.attach(handle.machine_id, kind, connect_unix(sock_path), log_path)
            except OSError as error:
                log.warning("machine %s: cannot read its %s: %s", handle.machine_id, kind, error)

    def _prepare_restore(self, spec: VmSpec, state: Path) -> list[str]:
        """The restore's command line; a kernel, initrd or disk that is gone makes the
        snapshot unusable (the guest ran from them)."""
        try:
            return self.prepare(spec)
        except VmmError as error:
            field = str(error.fields.get("field", ""))
            if field in ("kernel", "initrd", "root_disk") or field.startswith("extra_disks"):
                raise SnapshotUnusable(
                    f"the snapshot {state} cannot be restored: {error}",
                    reason="incompatible",
                    path=str(state),
                    machine_id=spec.machine_id,
                ) from error
            raise

    def _verify_snapshot(self, spec: VmSpec, state: Path, manifest: SnapshotManifest) -> None:
        """Raise :class:`SnapshotUnusable` unless the snapshot fits ``spec`` and is intact."""
        cold = spec.model_copy(update={"incoming_snapshot": None})
        now = vm_identity(cold, self.accel, binary=self._binary, hugepages_dir=self._hugepages_dir)
        check_restorable(state, manifest, identity_mismatch(manifest.vm, now), spec.machine_id)

    async def _load_snapshot(
        self, handle: VmHandle, child: subprocess.Popen[bytes], argv: list[str], spec: VmSpec
    ) -> None:
        """Wait until QEMU has loaded its incoming snapshot and holds the VM paused."""
        deadline = self._clock.monotonic() + self._timeouts.migrate_s(spec.memory_mb)
        try:
            launch_deadline = self._clock.monotonic() + self._launch_s(spec)
            await self._attach_channels(handle, child, argv, launch_deadline)
            await self._wait_until_answering(
                handle, child, argv, max(0.0, launch_deadline - self._clock.monotonic())
            )
            run_state = await wait_incoming_loaded(
                handle.qmp_socket,
                clock=self._clock,
                qmp_timeout_s=self._timeouts.qmp_s,
                deadline=deadline,
            )
        except VmmError as error:
            if isinstance(error, SnapshotUnusable) or not await self._exits_soon(child):
                raise
            raise _restore_failure(handle, spec, child) from error
        if run_state not in PAUSED_STATES:
            raise SnapshotUnusable(
                f"QEMU loaded the snapshot {spec.incoming_snapshot} into state {run_state}",
                reason="rejected",
                path=str(spec.incoming_snapshot),
                machine_id=spec.machine_id,
            )

    async def _exits_soon(self, child: subprocess.Popen[bytes]) -> bool:
        deadline = self._clock.monotonic() + self._timeouts.quit_grace_s
        while child.returncode is None and self._clock.monotonic() < deadline:
            await self._clock.sleep(LAUNCH_POLL_S)
        return child.returncode is not None

    async def signal(self, handle: VmHandle, signum: int) -> None:
        await send_guest_signal(
            handle.signal_socket, signum, clock=self._clock, timeout_s=self._timeouts.signal_s
        )

    async def stop(
        self, handle: VmHandle, timeout_s: float, clock: Clock, signum: int = SIGTERM
    ) -> StopOutcome:
        process = ProcessRef.open(handle.pid, handle.start_time)
        if process is None:
            return StopOutcome.NOT_RUNNING
        with process:
            deadline = clock.monotonic() + timeout_s
            try:
                await send_guest_signal(
                    handle.signal_socket,
                    signum,
                    clock=clock,
                    timeout_s=min(self._timeouts.signal_s, timeout_s),
                )
            except SignalNotDelivered as error:
                log.warning("machine %s: %s", handle.machine_id, error)
            if await exits_within(process, clock, deadline - clock.monotonic()):
                return StopOutcome.GUEST_EXITED

            log.info(
                "machine %s: still running after %s s, quitting QEMU", handle.machine_id, timeout_s
            )
            return await self._quit_or_kill(handle, process, clock)

    async def _quit_or_kill(
        self, handle: VmHandle, process: ProcessRef, clock: Clock
    ) -> StopOutcome:
        """Make QEMU quit through QMP, and failing that kill it; return once it is gone."""
        try:
            await qmp_execute(
                handle.qmp_socket, "quit", clock=clock, timeout_s=self._timeouts.qmp_s
            )
        except QmpError as error:
            log.warning("machine %s: %s", handle.machine_id, error)
        else:
            if await exits_within(process, clock, self._timeouts.quit_grace_s):
                return StopOutcome.QUIT

        log.warning("machine %s: killing QEMU pid %d", handle.machine_id, handle.pid)
        process.send_signal(SIGKILL)
        if await exits_within(process, clock, self._kill_grace_s(handle)):
            return StopOutcome.KILLED
        raise VmmError(
            f"QEMU pid {handle.pid} is still running after SIGKILL",
            machine_id=handle.machine_id,
            pid=handle.pid,
        )

    async def kill(self, handle: VmHandle) -> None:
        process = ProcessRef.open(handle.pid, handle.start_time)
        if process is None:
            return
        with process:
            process.send_signal(SIGKILL)
            if await exits_within(process, self._clock, self._kill_grace_s(handle)):
                return
        raise VmmError(
            f"QEMU pid {handle.pid} is still running after SIGKILL",
            machine_id=handle.machine_id,
            pid=handle.pid,
        )

    async def suspend(self, handle: VmHandle, snapshot_path: Path) -> SnapshotManifest:
        spec = suspendable_spec(handle)
        process = ProcessRef.open(handle.pid, handle.start_time)
        if process is None:
            return saved_before(snapshot_path, handle.machine_id)
        with process:
            if has_snapshot(snapshot_path) and await self._vm_state(handle) in PAUSED_STATES:
                # An earlier run committed the snapshot but did not end QEMU.
                await self._quit_or_kill(handle, process, self._clock)
                return read_manifest(snapshot_path)
            # A snapshot this VM has run on from, or what a cut-short run left: never restorable.
            drop_snapshot(snapshot_path)
            partial = create_partial_state(snapshot_path)
            deadline = self._clock.monotonic() + self._timeouts.migrate_s(spec.memory_mb)
            try:
                await save_to_file(
                    handle.qmp_socket,
                    partial,
                    clock=self._clock,
                    qmp_timeout_s=self._timeouts.qmp_s,
                    deadline=deadline,
                    max_bandwidth=self._migration_bandwidth,
                )
            except (MigrationFailed, TimeoutError, QmpError) as error:
                raise await self._suspend_failed(handle, process, snapshot_path, error) from error
            except BaseException:
                # Cancelled, as by a crash: the next run finds the migration and redoes it.
                partial.unlink(missing_ok=True)
                raise
            # The vCPUs are stopped and QEMU has flushed and released the disks: what the
            # snapshot records of them is final.
            vm = await asyncio.to_thread(
                vm_identity,
                spec,
                _accel_of(handle),
                binary=self._binary,
                hugepages_dir=self._hugepages_dir,
            )
            manifest = await asyncio.to_thread(
                commit_snapshot,
                snapshot_path,
                machine_id=handle.machine_id,
                vm=vm,
                now=self._clock.now(),
            )
            log.info(
                "machine %s: suspended into %s (%d bytes)",
                handle.machine_id,
                snapshot_path,
                manifest.state_size,
            )
            await self._quit_or_kill(handle, process, self._clock)
        return manifest

    async def _suspend_failed(
        self, handle: VmHandle, process: ProcessRef, snapshot_path: Path, error: BaseException
    ) -> SuspendFailed:
        """Clean up after a failed save and let the guest run on; the error to raise."""
        drop_snapshot(snapshot_path)
        resumed = False
        if not process.has_exited():
            with contextlib.suppress(QmpError, TimeoutError):
                await cancel_active_migration(
                    handle.qmp_socket,
                    clock=self._clock,
                    qmp_timeout_s=self._timeouts.qmp_s,
                    deadline=self._clock.monotonic() + self._timeouts.quit_grace_s,
                )
                await qmp_execute(
                    handle.qmp_socket, "cont", clock=self._clock, timeout_s=self._timeouts.qmp_s
                )
                resumed = True
        log.warning(
            "machine %s: suspend failed (%s); the guest %s",
            handle.machine_id,
            error,
            "runs on" if resumed else "is gone",
        )
        return SuspendFailed(
            f"suspending machine {handle.machine_id} failed: {error}",
            resumed=resumed,
            machine_id=handle.machine_id,
        )

    async def exec(
        self, handle: VmHandle, argv: Sequence[str], *, stdin: bytes = b"", timeout_s: float
    ) -> ExecResult:
        return await exec_in_guest(
            handle, argv, stdin=stdin, timeout_s=timeout_s, clock=self._clock
        )

    async def processes(self, handle: VmHandle) -> list[GuestProcess]:
        return await list_guest_processes(handle, clock=self._clock)

    async def status(self, handle: VmHandle) -> VmStatus:
        running = self.is_running(handle)
        if not running and handle.control_socket is not None:
            await asyncio.to_thread(
                self.channels.wait_done, handle.machine_id, "control", DRAIN_TIMEOUT_S
            )
        events = await asyncio.to_thread(read_control_events, handle.control_log)
        report = summarise_control_events(events)
        if running:
            vm_state = await self._vm_state(handle)
            error = report.error
            if error is None and vm_state in FAILED_VM_STATES:
                error = f"the VM is in state {vm_state}"
            return VmStatus(
                state="running",
                guest_ready=report.ready,
                exit_code=report.exit_code,
                error=error,
                vm_state=vm_state,
            )
        vmm_exit_status = await self._child_exit_status(handle)
        error = report.error
        if error is None and report.exit_code is None:
            error = _unexplained_exit(handle, vmm_exit_status)
        return VmStatus(
            state="exited",
            guest_ready=report.ready,
            exit_code=report.exit_code,
            error=error,
            vmm_exit_status=vmm_exit_status,
        )

    async def adopt(self, handle: VmHandle) -> bool:
        refusal = await self._adoption_refusal(handle)
        if refusal is not None:
            log.warning(
                "machine %s: not adopting pid %d: %s", handle.machine_id, handle.pid, refusal
            )
            return False
        log.info("machine %s: adopted QEMU pid %d", handle.machine_id, handle.pid)
        self._reattach_channels(handle)
        return True

    async def _adoption_refusal(self, handle: VmHandle) -> str | None:
        if handle.driver != self.name:
            return f"the handle belongs to driver {handle.driver!r}"
        refusal = adoption_refusal(
            handle.pid,
            handle.start_time,
            lambda cmdline: _names_machine(cmdline, handle.machine_id),
            "this machine's QEMU",
        )
        if refusal is not None:
            return refusal
        try:
            await query_status(handle.qmp_socket, clock=self._clock, timeout_s=self._timeouts.qmp_s)
        except QmpError as error:
            return f"its monitor does not answer ({error})"
        return None

    def _launch_s(self, spec: VmSpec) -> float:
        """A GPU machine preallocates and pins all its memory before QEMU answers."""
        topology = spec.gpu_topology
        if topology is None:
            return self._timeouts.launch_s
        return max(
            self._timeouts.launch_s, launch_timeout_s(spec.memory_mb, topology.memory.page_size)
        )

    def _kill_grace_s(self, handle: VmHandle) -> float:
        """The grace, plus the time unpinning a large guest's memory takes."""
        return self._timeouts.kill_grace_s + unpin_time_s(handle.memory_mb or 0)

    async def _wait_until_answering(
        self, handle: VmHandle, child: subprocess.Popen[bytes], argv: list[str], launch_s: float
    ) -> None:
        deadline = self._clock.monotonic() + launch_s
        while True:
            if child.returncode is not None:
                stderr = tail_text(handle.vmm_log, VMM_LOG_QUOTE_CHARS)
                last_line = stderr.strip().splitlines()[-1] if stderr.strip() else "no message"
                raise VmmError(
                    f"QEMU for machine {handle.machine_id} exited during launch "
                    f"(status {child.returncode}): {last_line}",
                    machine_id=handle.machine_id,
                    exit_status=child.returncode,
                    stderr=stderr,
                    argv=argv,
                )
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                raise VmmError(
                    f"QEMU for machine {handle.machine_id} did not answer QMP within "
                    f"{launch_s:g} s",
                    machine_id=handle.machine_id,
                    stderr=tail_text(handle.vmm_log, VMM_LOG_QUOTE_CHARS),
                    argv=argv,
                )
            # Until QEMU has made its socket a connection attempt can only fail (noisily).
            if handle.qmp_socket.exists():
                try:
                    await query_status(handle.qmp_socket, clock=self._clock, timeout_s=remaining)
                    return
                except QmpError:
                    pass
            await self._clock.sleep(LAUNCH_POLL_S)

    def is_running(self, handle: VmHandle) -> bool:
        return is_alive(handle.pid, handle.start_time)

    async def _vm_state(self, handle: VmHandle) -> str | None:
        try:
            return await query_status(
                handle.qmp_socket, clock=self._clock, timeout_s=self._timeouts.qmp_s
            )
        except QmpError as error:
            log.info("machine %s: %s", handle.machine_id, error)
            return None

    async def _child_exit_status(self, handle: VmHandle) -> int | None:
        return await self._children.exit_status(handle.pid, handle.start_time)


def _names_machine(cmdline: tuple[str, ...], machine_id: str) -> bool:
    expected = machine_process_name(machine_id)
    return any(flag == "-name" and value == expected for flag, value in itertools.pairwise(cmdline))


def _clear_run_files(spec: VmSpec, *, keep_control_log: bool = False) -> None:
    """Make the directories, and drop what a previous boot left that would mislead this one
    (a restored guest goes on with the control log of its boot)."""
    for path in (
        spec.console_log,
        spec.control_log,
        spec.signal_socket,
        spec.exec_socket,
        spec.qmp_socket,
        spec.vmm_log,
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
    stale = [spec.signal_socket, spec.exec_socket, spec.qmp_socket]
    stale += [path for path in (spec.console_socket, spec.control_socket) if path is not None]
    if not keep_control_log:
        stale.append(spec.control_log)
    for path in stale:
        path.unlink(missing_ok=True)


def suspendable_spec(handle: VmHandle) -> VmSpec:
    """The spec of a VM that can be suspended; :class:`SuspendNotSupported` otherwise."""
    if handle.spec is None:
        raise SuspendNotSupported(
            f"machine {handle.machine_id} was started by a hangar that did not record its "
            "spec: restart it before suspending it",
            field="machine",
            machine_id=handle.machine_id,
        )
    if handle.spec.gpus:
        raise SuspendNotSupported(
            f"machine {handle.machine_id} has GPUs: a VFIO device cannot be suspended",
            field="config.guest.gpus",
            machine_id=handle.machine_id,
        )
    return handle.spec


def _accel_of(handle: VmHandle) -> AccelChoice:
    """The accelerator the handle's VM was launched with."""
    choice = kvm_choice if handle.accel == "kvm" else tcg_choice
    return choice("the VM runs so").model_copy(
        update={"machine_type": handle.machine_type, "cpu_model": handle.cpu_model}
    )


async def _exception_of(task: asyncio.Future[None]) -> BaseException | None:
    try:
        await task
    except BaseException as error:
        return error
    return None


def _restore_failure(
    handle: VmHandle, spec: VmSpec, child: subprocess.Popen[bytes]
) -> SnapshotUnusable | VmmError:
    """Why QEMU ended while loading a snapshot: the stream (the snapshot is unusable), or
    something else (the snapshot is kept for another try)."""
    stderr = tail_text(handle.vmm_log, VMM_LOG_QUOTE_CHARS)
    last_line = stderr.strip().splitlines()[-1] if stderr.strip() else "no message"
    fields: dict[str, Any] = {
        "machine_id": spec.machine_id,
        "exit_status": child.returncode,
        "stderr": stderr,
    }
    if any(word in stderr.lower() for word in _REJECTED_STREAM_WORDS):
        return SnapshotUnusable(
            f"QEMU could not load the snapshot {spec.incoming_snapshot}: {last_line}",
            reason="rejected",
            path=str(spec.incoming_snapshot),
            **fields,
        )
    return VmmError(
        f"QEMU for machine {spec.machine_id} exited while restoring (status "
        f"{child.returncode}): {last_line}",
        **fields,
    )


def _unexplained_exit(handle: VmHandle, vmm_exit_status: int | None) -> str:
    detail = "" if vmm_exit_status is None else f" (QEMU status {vmm_exit_status})"
    message = f"QEMU exited before the guest reported an exit{detail}"
    last_lines = tail_text(handle.vmm_log, VMM_LOG_QUOTE_CHARS).strip().splitlines()[-3:]
    if last_lines:
        message += ": " + " | ".join(last_lines)
    return message


def _remove_volume_key_files(spec: VmSpec) -> None:
    for volume in spec.volumes:
        if volume.key_file is not None:
            volume.key_file.unlink(missing_ok=True)
