"""``hangar bench boot``: hangar's boot path against plain QEMU, side by side in one run.

(a) plain QEMU: the same kernel, initrd and root disk hangar built for a machine, the same
    command line, launched directly; timed from exec to the guest's ``hangar-init: ready``.
(b) hangar, start of a stopped machine: ``POST .../start`` until the machine is ``started``
    and its console shows ``hangar-init: ready``.
(c) hangar, create to started (+ ready) from an image already in the cache.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from hangar.agent.platform import RunDirLayout
from hangar.server_process import ServerProcess
from hangar.vmm.accel import choose_accel
from hangar.vmm.driver import VmSpec
from hangar.vmm.qemu_argv import qemu_argv

READY_LINE = b"hangar-init: ready"
POLL_S = 0.005
TIMEOUT_S = 180.0
APP = "bench"
SLEEPER = ["sh", "-c", "sleep 3600"]


@dataclass
class BootBenchResult:
    plain_qemu_s: list[float]
    hangar_start_s: list[float]
    hangar_create_s: list[float]

    @property
    def ratio(self) -> float:
        return statistics.median(self.hangar_start_s) / statistics.median(self.plain_qemu_s)

    def report(self) -> str:
        rows = [
            ("(a) plain QEMU, exec to init-ready", self.plain_qemu_s),
            ("(b) hangar start (stopped machine) to started+ready", self.hangar_start_s),
            ("(c) hangar create to started+ready (cached image)", self.hangar_create_s),
        ]
        lines = [f"{'path':<55} {'median':>8} {'min':>8} {'max':>8}  runs"]
        for label, samples in rows:
            lines.append(
                f"{label:<55} {statistics.median(samples):>7.3f}s {min(samples):>7.3f}s "
                f"{max(samples):>7.3f}s  {len(samples)}"
            )
        lines.append(f"ratio hangar/qemu: {self.ratio:.2f}")
        return "\n".join(lines)


def _wait_for_bytes(path: Path, needle: bytes, deadline: float) -> None:
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_bytes():
            return
        time.sleep(POLL_S)
    raise TimeoutError(f"{needle!r} did not appear in {path}")


def _wait_state(api: httpx.Client, machine_path: str, state: str) -> None:
    response = api.get(f"{machine_path}/wait", params={"state": state, "timeout": 60})
    if response.status_code != 200:
        raise RuntimeError(f"machine did not reach {state}: {response.text}")


def plain_qemu_boot(spec: VmSpec) -> float:
    argv = qemu_argv(spec, choose_accel())
    spec.console_log.unlink(missing_ok=True)
    started = time.monotonic()
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_for_bytes(spec.console_log, READY_LINE, started + TIMEOUT_S)
        return time.monotonic() - started
    finally:
        process.kill()
        process.wait()


def run_boot_bench(image: str, runs: int, home: Path) -> BootBenchResult:
    result = BootBenchResult([], [], [])
    with ServerProcess(home) as server, server.client() as api:
        api.post("/v1/apps", json={"app_name": APP})
        config = {
            "image": image,
            "init": {"cmd": SLEEPER},
            "restart": {"policy": "no"},
            "stop_config": {"timeout": "1s"},
        }
        created = api.post(f"/v1/apps/{APP}/machines", json={"config": config})
        created.raise_for_status()
        machine_id = created.json()["id"]
        path = f"/v1/apps/{APP}/machines/{machine_id}"
        run_dir = home / "machines" / machine_id
        console = run_dir / RunDirLayout.CONSOLE_LOG
        _wait_state(api, path, "started")
        _wait_for_bytes(console, READY_LINE, time.monotonic() + TIMEOUT_S)
        plain_dir = Path(tempfile.mkdtemp(prefix="plain-", dir=home))
        for name in RunDirLayout.BOOT_FILES:
            shutil.copyfile(run_dir / name, plain_dir / name)
        kernel = _kernel_of(run_dir)
        spec = VmSpec.in_run_dir(
            machine_id="plain-qemu",
            run_dir=plain_dir,
            kernel=kernel,
            initrd=plain_dir / RunDirLayout.INITRD,
            root_disk=plain_dir / RunDirLayout.ROOT_DISK,
            channel_sockets=False,
        )
        api.post(f"{path}/stop").raise_for_status()
        _wait_state(api, path, "stopped")
        for _ in range(runs):
            result.plain_qemu_s.append(plain_qemu_boot(spec))
            started = time.monotonic()
            api.post(f"{path}/start").raise_for_status()
            _wait_state(api, path, "started")
            _wait_for_bytes(console, READY_LINE, started + TIMEOUT_S)
            result.hangar_start_s.append(time.monotonic() - started)
            api.post(f"{path}/stop").raise_for_status()
            _wait_state(api, path, "stopped")
            started = time.monotonic()
            fresh = api.post(f"/v1/apps/{APP}/machines", json={"config": config})
            fresh.raise_for_status()
            fresh_path = f"/v1/apps/{APP}/machines/{fresh.json()['id']}"
            _wait_state(api, fresh_path, "started")
            fresh_console = home / "machines" / fresh.json()["id"] / RunDirLayout.CONSOLE_LOG
            _wait_for_bytes(fresh_console, READY_LINE, started + TIMEOUT_S)
            result.hangar_create_s.append(time.monotonic() - started)
            api.delete(fresh_path, params={"force": "true"}).raise_for_status()
            _wait_state(api, fresh_path, "destroyed")
        api.delete(path, params={"force": "true"}).raise_for_status()
        _wait_state(api, path, "destroyed")
        shutil.rmtree(plain_dir, ignore_errors=True)
    return result


def _kernel_of(run_dir: Path) -> Path:
    """The kernel hangar's own QEMU for this machine was started with."""
    from hangar.agent.guest import find_vmm_processes
    from hangar.vmm.proc import read_process

    for pid, machine_id in find_vmm_processes(run_dir.parent).items():
        if machine_id == run_dir.name:
            info = read_process(pid)
            if info is not None:
                return Path(info.cmdline[info.cmdline.index("-kernel") + 1])
    raise RuntimeError(f"no running VMM for {run_dir.name}")
