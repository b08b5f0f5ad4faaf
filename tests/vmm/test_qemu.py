"""QemuDriver against real QEMU booting hangar's own init over the test image."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from hangar.clock import ManualClock
from hangar.errors import VmmError
from hangar.vmm.accel import KVM_MACHINE_TYPE, TCG_CPU_MODEL, AccelChoice
from hangar.vmm.driver import StopOutcome, VmHandle, VmStatus
from hangar.vmm.proc import read_process
from hangar.vmm.qemu import QemuDriver
from tests.vmm.guest import hang_guarded, wait_for_console, wait_for_event
from tests.vmm.machines import Machines
from tests.vmm.watched_clock import WatchedClock

STOP_TIMEOUT_S = 30.0
SLEEPER = ["sleep", "3600"]
# Takes SIGTERM and carries on, saying so on the console.
STUBBORN = ["sh", "-c", "trap 'echo got-term' TERM; while true; do sleep 1; done"]


def said(text: str) -> Callable[[str], bool]:
    return lambda console: text in console


async def exited_status(driver: QemuDriver, handle: VmHandle) -> VmStatus:
    while (status := await driver.status(handle)).state != "exited":
        await asyncio.sleep(0.1)
    return status


@pytest.mark.slow
@hang_guarded
async def test_guest_exit_code_and_read_only_disk_reach_the_host(
    machines: Machines, host_accel: AccelChoice
) -> None:
    driver = QemuDriver(accel=host_accel)
    spec = machines.spec(
        "exit7",
        ["sh", "-c", "echo ro=$(cat /sys/block/vdb/ro) rw=$(cat /sys/block/vda/ro); exit 7"],
        read_only_disk=True,
    )

    handle = machines.track(await driver.launch(spec))
    assert (handle.accel, handle.machine_type) == (host_accel.accel, host_accel.machine_type)
    status = await exited_status(driver, handle)

    assert status.guest_ready
    assert status.exit_code == 7
    assert status.error is None
    assert status.vmm_exit_status == 0
    assert "ro=1 rw=0" in spec.console_log.read_text()
    await driver.kill(handle)
    assert await driver.stop(handle, STOP_TIMEOUT_S, ManualClock()) is StopOutcome.NOT_RUNNING


@pytest.mark.slow
@hang_guarded
async def test_stop_sends_sigterm_that_the_guest_exits_on(
    machines: Machines, host_accel: AccelChoice
) -> None:
    driver = QemuDriver(accel=host_accel)
    spec = machines.spec("term", SLEEPER)
    handle = machines.track(await driver.launch(spec))
    await wait_for_event(spec.control_log, "ready")

    outcome = await driver.stop(handle, STOP_TIMEOUT_S, ManualClock())

    assert outcome is StopOutcome.GUEST_EXITED
    status = await driver.status(handle)
    assert status.state == "exited"
    assert status.exit_code == 128 + signal.SIGTERM


@pytest.mark.slow
@hang_guarded
async def test_stop_quits_qemu_when_the_guest_ignores_sigterm(
    machines: Machines, host_accel: AccelChoice
) -> None:
    driver = QemuDriver(accel=host_accel)
    spec = machines.spec("ignore", STUBBORN)
    handle = machines.track(await driver.launch(spec))
    await wait_for_event(spec.control_log, "ready")
    clock = WatchedClock()

    stopping = asyncio.create_task(driver.stop(handle, STOP_TIMEOUT_S, clock))
    await wait_for_console(spec.console_log, said("got-term"))
    await clock.advance_once_sleeping(STOP_TIMEOUT_S)
    outcome = await stopping

    assert outcome is StopOutcome.QUIT
    status = await driver.status(handle)
    assert status.state == "exited"
    assert status.exit_code is None
    assert status.vmm_exit_status == 0
    assert status.error is not None
    assert "before the guest reported an exit" in status.error


@pytest.mark.slow
@hang_guarded
async def test_stop_kills_qemu_whose_monitor_is_gone(
    machines: Machines, host_accel: AccelChoice
) -> None:
    driver = QemuDriver(accel=host_accel)
    spec = machines.spec("deaf", STUBBORN)
    handle = machines.track(await driver.launch(spec))
    await wait_for_event(spec.control_log, "ready")
    without_monitor = handle.model_copy(update={"qmp_socket": spec.run_dir / "gone.sock"})
    clock = WatchedClock()

    stopping = asyncio.create_task(driver.stop(without_monitor, STOP_TIMEOUT_S, clock))
    await clock.advance_once_sleeping(STOP_TIMEOUT_S)
    outcome = await stopping

    assert outcome is StopOutcome.KILLED
    status = await driver.status(handle)
    assert status.state == "exited"
    assert status.vmm_exit_status == -signal.SIGKILL


LAUNCH_AND_LEAVE = """
import asyncio, sys
from hangar.vmm.accel import KVM_MACHINE_TYPE, TCG_CPU_MODEL, AccelChoice
from hangar.vmm.driver import VmSpec
from hangar.vmm.qemu import QemuDriver
accel = AccelChoice.model_validate_json(sys.argv[1])
spec = VmSpec.model_validate_json(sys.argv[2])
print(asyncio.run(QemuDriver(accel=accel).launch(spec)).model_dump_json())
"""


@pytest.mark.slow
@hang_guarded
async def test_a_new_driver_adopts_the_vm_of_an_agent_that_died(
    machines: Machines, host_accel: AccelChoice
) -> None:
    spec = machines.spec("adopt", STUBBORN)
    # This "agent" launches QEMU and exits, so QEMU is no child of the test process.
    agent = subprocess.run(
        [
            sys.executable,
            "-c",
            LAUNCH_AND_LEAVE,
            host_accel.model_dump_json(),
            spec.model_dump_json(),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    handle = machines.track(VmHandle.model_validate_json(agent.stdout))
    driver = QemuDriver(accel=host_accel)
    finished = subprocess.Popen(["true"])
    finished.wait()
    unrelated = subprocess.Popen(["sleep", "600"])
    try:
        unrelated_info = read_process(unrelated.pid)
        assert unrelated_info is not None

        assert await driver.adopt(handle)
        reused_pid = handle.model_copy(update={"start_time": handle.start_time + 1})
        assert not await driver.adopt(reused_pid)
        dead_pid = handle.model_copy(update={"pid": finished.pid})
        assert not await driver.adopt(dead_pid)
        not_qemu = handle.model_copy(
            update={"pid": unrelated.pid, "start_time": unrelated_info.start_time}
        )
        assert not await driver.adopt(not_qemu)
        assert not await driver.adopt(handle.model_copy(update={"driver": "firecracker"}))
    finally:
        unrelated.kill()
        unrelated.wait()

    await wait_for_event(spec.control_log, "ready")
    status = await driver.status(handle)
    assert (status.state, status.guest_ready, status.vm_state) == ("running", True, "running")

    await driver.signal(handle, signal.SIGTERM)
    await wait_for_console(spec.console_log, said("got-term"))

    await driver.kill(handle)
    status = await driver.status(handle)
    assert status.state == "exited"
    assert status.vmm_exit_status is None
    assert not await driver.adopt(handle)


@hang_guarded
async def test_launch_failure_carries_qemu_stderr(
    machines: Machines, host_accel: AccelChoice
) -> None:
    driver = QemuDriver(accel=host_accel)
    spec = machines.spec("nogpu", SLEEPER).model_copy(update={"gpus": ["0000:ff:1f.7"]})

    with pytest.raises(VmmError) as raised:
        await driver.launch(spec)

    error = raised.value
    assert error.fields["exit_status"] == 1
    assert "0000:ff:1f.7" in error.fields["stderr"]
    assert "0000:ff:1f.7" in error.message
    assert "vfio-pci,host=0000:ff:1f.7" in error.fields["argv"]


@hang_guarded
async def test_qemu_takes_the_microvm_command_line_with_file_backed_memory(
    machines: Machines, tmp_path: Path
) -> None:
    # KVM hosts get microvm; here it runs under TCG only until QEMU answers, as a TCG
    # microvm guest may hang early in boot (why TCG hosts get q35), and that is no matter.
    microvm = AccelChoice(
        accel="tcg", machine_type=KVM_MACHINE_TYPE, cpu_model=TCG_CPU_MODEL, reason="test"
    )
    memory_dir = tmp_path / "hugepages"
    memory_dir.mkdir()
    driver = QemuDriver(accel=microvm, hugepages_dir=memory_dir)
    spec = machines.spec("micro", SLEEPER).model_copy(update={"hugepages": True, "memory_mb": 128})

    handle = machines.track(await driver.launch(spec))
    status = await driver.status(handle)
    await driver.kill(handle)

    assert (status.state, status.vm_state) == ("running", "running")
    assert (await driver.status(handle)).vmm_exit_status == -signal.SIGKILL
