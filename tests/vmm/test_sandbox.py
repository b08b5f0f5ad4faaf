"""The sandbox driver on real runtimes: gVisor's runsc (and runc, the operator's opt-in) run a
busybox root folder; output, exit codes, stop, kill, adoption by a new driver instance, exec,
and a container that cannot start."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from hangar.agent.guest import sandbox_driver
from hangar.clock import SystemClock
from hangar.errors import Unprocessable, VmmError
from hangar.images.root_tree import resolve_user, write_into_root
from hangar.settings import Settings
from hangar.vmm.channels import ChannelLimits, previous_console_log
from hangar.vmm.container import ContainerSpec, oci_config
from hangar.vmm.control import read_control_events
from hangar.vmm.driver import NicSpec, StopOutcome, VmSpec
from hangar.vmm.proc import read_process
from hangar.vmm.sandbox import (
    SandboxDriver,
    SandboxRuntime,
    SandboxTimeouts,
    find_shims,
    rootfs_dir,
    state_root_for,
)
from tests.conftest import RUNSC

BUSYBOX = Path("/bin/busybox")


def runtime_binary(runtime: SandboxRuntime) -> str:
    binary = str(RUNSC) if runtime is SandboxRuntime.RUNSC else "runc"
    if shutil.which(binary) is None:
        pytest.fail(f"{binary} is missing: `make runsc deps` installs the sandbox runtimes")
    return binary


@pytest.fixture(params=[SandboxRuntime.RUNSC, SandboxRuntime.RUNC], ids=["runsc", "runc"])
def driver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SandboxDriver]:
    runtime: SandboxRuntime = request.param
    machines = tmp_path / "machines"
    machines.mkdir()
    yield SandboxDriver(
        binary=runtime_binary(runtime),
        state_root=state_root_for(machines, runtime),
        runtime=runtime,
        timeouts=SandboxTimeouts(launch_s=30, kill_grace_s=10),
    )
    for pid in find_shims(machines):
        os.killpg(pid, 9)
    shutil.rmtree(state_root_for(machines, runtime), ignore_errors=True)


def busybox_spec(tmp_path: Path, argv: list[str], **container: object) -> VmSpec:
    machine_id = f"sbx{secrets.token_hex(4)}"
    run_dir = tmp_path / "machines" / machine_id
    rootfs = rootfs_dir(run_dir)
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, rootfs / "bin/busybox")
    for applet in ("sh", "echo", "sleep", "cat", "id", "hostname"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc").mkdir()
    (rootfs / "etc/passwd").write_text("root:x:0:0::/:/bin/sh\napp:x:1000:1000::/:/bin/sh\n")
    return VmSpec.in_run_dir(
        machine_id=machine_id,
        run_dir=run_dir,
        kernel=None,
        initrd=None,
        root_disk=rootfs,
        container=ContainerSpec(rootfs=rootfs, argv=argv, hostname=machine_id, **container),  # type: ignore[arg-type]
    )


async def wait_exited(driver: SandboxDriver, spec: VmSpec, handle_pid: int) -> None:
    deadline = asyncio.get_running_loop().time() + 30
    while (info := read_process(handle_pid)) is not None and not info.exited:
        assert asyncio.get_running_loop().time() < deadline, "the sandbox never ended"
        await asyncio.sleep(0.02)


def test_a_container_runs_prints_and_reports_its_exit_code(
    driver: SandboxDriver, tmp_path: Path
) -> None:
    spec = busybox_spec(
        tmp_path,
        ["sh", "-c", 'echo "out:$MODE:$(hostname):$(id -u)"; echo err >&2; exit 7'],
        env={"MODE": "test"},
        uid=1000,
        gid=1000,
    )

    async def run() -> None:
        handle = await driver.launch(spec)
        assert handle.driver == driver.name and handle.machine_type == "sandbox"
        await wait_exited(driver, spec, handle.pid)
        status = await driver.status(handle)
        assert status.state == "exited"
        assert status.exit_code == 7
        assert not driver.is_running(handle)
        await driver.kill(handle)  # nothing left to kill: a no-op

    asyncio.run(run())
    console = spec.console_log.read_text()
    assert f"out:test:{spec.machine_id}:1000" in console
    assert "err" in console
    events = read_control_events(spec.control_log)
    assert events[-1] == {"type": "exit", "code": 7}


def test_stop_signals_then_kills(driver: SandboxDriver, tmp_path: Path) -> None:
    polite = busybox_spec(
        tmp_path,
        ["sh", "-c", "trap 'exit 42' TERM; echo trapped; while true; do sleep 0.1; done"],
    )
    stubborn = busybox_spec(
        tmp_path, ["sh", "-c", "trap '' TERM; echo trapped; while true; do sleep 0.1; done"]
    )

    async def run() -> None:
        clock = SystemClock()
        for spec, timeout_s, outcome, code in (
            (polite, 10.0, StopOutcome.GUEST_EXITED, 42),
            (stubborn, 0.5, StopOutcome.KILLED, None),
        ):
            handle = await driver.launch(spec)
            await _wait_for(lambda: "trapped" in spec.console_log.read_text())  # noqa: B023
            assert await driver.stop(handle, timeout_s, clock) is outcome
            assert not driver.is_running(handle)
            status = await driver.status(handle)
            if code is not None:
                assert status.exit_code == code
            assert await driver.stop(handle, 1.0, clock) is StopOutcome.NOT_RUNNING

    asyncio.run(run())


def test_a_new_driver_adopts_a_running_sandbox_then_kills_it(
    driver: SandboxDriver, tmp_path: Path
) -> None:
    spec = busybox_spec(tmp_path, ["sh", "-c", "echo up; while true; do sleep 0.1; done"])

    async def run() -> None:
        handle = await driver.launch(spec)
        # As after an agent restart: a driver instance that did not launch it.
        again = SandboxDriver(
            binary=driver._binary,
            state_root=driver._state_root,
            runtime=driver.runtime,
        )
        assert await again.adopt(handle)
        result = await again.exec(handle, ["cat", "/etc/passwd"], timeout_s=20)
        assert result.exit_code == 0 and b"app:x:1000" in result.stdout
        late = await again.exec(handle, ["sh", "-c", "exit 3"], timeout_s=20)
        assert late.exit_code == 3
        processes = await again.processes(handle)
        assert any(p.command in ("sh", "busybox", "/bin/sh") for p in processes), processes
        await again.kill(handle)
        assert not again.is_running(handle)
        assert not await again.adopt(handle)
        assert spec.machine_id not in find_shims(tmp_path / "machines").values()

    asyncio.run(run())


def test_a_container_that_cannot_start_fails_the_launch_and_leaves_nothing(
    driver: SandboxDriver, tmp_path: Path
) -> None:
    spec = busybox_spec(tmp_path, ["/bin/no-such-program"])
    with pytest.raises(VmmError, match="no-such-program") as caught:
        asyncio.run(driver.launch(spec))
    assert not caught.value.retryable
    assert find_shims(tmp_path / "machines") == {}


def test_a_vm_spec_is_refused_and_runc_only_when_asked(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert sandbox_driver(Settings(home=home)).runtime is SandboxRuntime.RUNSC
    assert sandbox_driver(Settings(home=home, sandbox_runtime="runc")).name == "runc"
    vm = VmSpec.in_run_dir(
        machine_id="vm1",
        run_dir=tmp_path,
        kernel=tmp_path / "k",
        initrd=tmp_path / "i",
        root_disk=tmp_path / "r",
    )
    with pytest.raises(Unprocessable, match="runs containers"):
        sandbox_driver(Settings(home=home)).prepare(vm)


def test_files_go_into_the_root_and_links_out_of_it_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    write_into_root(root, "/etc/app/app.conf", b"hello", 0o600)
    written = root / "etc/app/app.conf"
    assert written.read_bytes() == b"hello" and written.stat().st_mode & 0o777 == 0o600
    outside = tmp_path / "host-etc"
    outside.mkdir()
    (root / "evil").symlink_to(outside)
    with pytest.raises(Unprocessable):
        write_into_root(root, "/evil/passwd", b"x", 0o644)
    (root / "etc/link").symlink_to(outside / "file")
    with pytest.raises(Unprocessable):
        write_into_root(root, "/etc/link", b"x", 0o644)
    assert list(outside.iterdir()) == []


def test_image_users_resolve_against_the_roots_own_accounts(tmp_path: Path) -> None:
    root = tmp_path
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0::/:/bin/sh\napp:x:1000:1001::/:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\nstaff:x:50:app\n")
    assert resolve_user(root, "") == (0, 0)
    assert resolve_user(root, "app") == (1000, 1001)
    assert resolve_user(root, "1000") == (1000, 1001)
    assert resolve_user(root, "app:staff") == (1000, 50)
    assert resolve_user(root, "4242:7") == (4242, 7)
    with pytest.raises(Unprocessable, match="nobody"):
        resolve_user(root, "nobody")


async def _wait_for(condition: object, timeout_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            if condition():  # type: ignore[operator]
                return
        except FileNotFoundError:
            pass
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_a_sandbox_on_the_private_network_joins_its_namespace_with_netstack(
    tmp_path: Path,
) -> None:
    netns = tmp_path / "netns"
    netns.touch()
    plain = busybox_spec(tmp_path, ["true"])
    spec = plain.model_copy(
        update={"nic": NicSpec(tap="hgt0", mac="02:00:00:00:00:01", netns=netns)}
    )
    runsc = SandboxDriver(binary=str(RUNSC), state_root=tmp_path / "state")
    runc = SandboxDriver(binary="runc", state_root=tmp_path / "state", runtime=SandboxRuntime.RUNC)

    assert "--network=none" in runsc.global_flags(plain)
    assert "--network=sandbox" in runsc.global_flags(spec)
    assert runc.global_flags(spec) == []
    # the shim's 8th word: run runsc with /proc/sys/net hidden (gVisor issue 10704)
    assert runsc.prepare(spec)[11] == "1" and runsc.prepare(plain)[11] == "0"
    assert runc.prepare(spec)[11] == "0"
    assert spec.container is not None
    namespaces = oci_config(spec.container, cpus=1, memory_mb=64, netns=netns)["linux"][
        "namespaces"
    ]
    assert {"type": "network", "path": str(netns)} in namespaces
    default = oci_config(spec.container, cpus=1, memory_mb=64)["linux"]["namespaces"]
    assert {"type": "network"} in default
    netns.unlink()
    with pytest.raises(VmmError, match="network namespace"):
        runsc.prepare(spec)


def test_a_container_nic_is_a_namespace_and_a_vm_nic_a_tap(tmp_path: Path) -> None:
    spec = busybox_spec(tmp_path, ["true"])
    with pytest.raises(ValueError, match="network namespace"):
        spec.model_validate(
            {**spec.model_dump(), "nic": {"tap": "hgt0", "mac": "02:00:00:00:00:01"}}
        )
    vm = {
        **spec.model_dump(),
        "container": None,
        "kernel": tmp_path / "k",
        "initrd": tmp_path / "i",
        "nic": {"tap": "hgt0", "mac": "02:00:00:00:00:01", "netns": str(tmp_path)},
    }
    with pytest.raises(ValueError, match="network namespace"):
        VmSpec.model_validate(vm)
    assert VmSpec.model_validate({**vm, "nic": {"tap": "hgt0", "mac": "02:00:00:00:00:01"}}).nic


def test_a_flooding_container_keeps_a_bounded_console(tmp_path: Path) -> None:
    """A container writing 2 MB keeps only its console bound (the newest output) and still
    reports its exit code: its output goes through the console writer, as a VM's does."""
    machines = tmp_path / "machines"
    machines.mkdir()
    bound = 256 * 1024
    driver = SandboxDriver(
        binary=runtime_binary(SandboxRuntime.RUNSC),
        state_root=state_root_for(machines, SandboxRuntime.RUNSC),
        timeouts=SandboxTimeouts(launch_s=30, kill_grace_s=10),
        channel_limits=ChannelLimits(console_max_bytes=bound, rate_bytes=64 * 1024 * 1024),
    )
    flood = 'i=0; while [ $i -lt 20000 ]; do echo "flood $i $PAD"; i=$((i + 1)); done; exit 3'
    spec = busybox_spec(tmp_path, ["sh", "-c", flood], env={"PAD": "x" * 90})

    async def run() -> None:
        handle = await driver.launch(spec)
        try:
            await wait_exited(driver, spec, handle.pid)
            assert (await driver.status(handle)).exit_code == 3
        finally:
            await driver.kill(handle)

    try:
        asyncio.run(run())
    finally:
        for pid in find_shims(machines):
            os.killpg(pid, 9)
        shutil.rmtree(state_root_for(machines, SandboxRuntime.RUNSC), ignore_errors=True)
    kept = spec.console_log.read_bytes() + previous_console_log(spec.console_log).read_bytes()
    assert 0 < len(kept) <= bound + 64 * 1024
    assert b"flood 19999 " in kept
    assert read_control_events(spec.control_log)[-1] == {"type": "exit", "code": 3}
