"""``hangar bench boot``: hangar's boot path against plain QEMU, side by side in one run.

(a) plain QEMU: the same kernel, initrd and root disk hangar built for a machine, the same
    command line, launched directly; timed from exec to the guest's ``hangar-init: ready``.
(b) hangar, start of a stopped machine: ``POST .../start`` until the machine is ``started``
    and its console shows ``hangar-init: ready``.
(c) hangar, create to started (+ ready) from an image already in the cache.
(d) hangar, start of a suspended machine: ``POST .../start`` until the console shows a line
    the guest printed after the resume (the machine's process prints one every 0.1 s); the
    machine is suspended again (``POST .../suspend``) between runs, outside the timing.
(e) a sandbox-tier machine (runsc), start of a stopped one until its process prints a line;
(f) the same machine suspended (gVisor's checkpoint), start until it prints a new line.
    (e) and (f) run where the sandbox runtime is installed (``HANGAR_RUNSC`` or ``runsc`` on
    ``PATH``; ``make bench-boot`` names the one ``make runsc`` installs); the report ends
    with ``ratio sandbox resume/start``.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from hangar.model.guest_contract import RunDir
from hangar.server_process import ServerProcess
from hangar.settings import Settings
from hangar.vmm.accel import choose_accel
from hangar.vmm.driver import VmSpec
from hangar.vmm.qemu_argv import qemu_argv

READY_LINE = b"hangar-init: ready"
POLL_S = 0.005
TIMEOUT_S = 180.0
APP = "bench"
TICKER = ["sh", "-c", "while :; do echo tick; sleep 0.1; done"]
"""The machine's process: a line every 0.1 s shows, after a resume, that the guest runs."""


@dataclass
class BootBenchResult:
    plain_qemu_s: list[float]
    hangar_start_s: list[float]
    hangar_create_s: list[float]
    resume_s: list[float] = field(default_factory=list)
    resume_path: str = "API"
    sandbox_start_s: list[float] = field(default_factory=list)
    sandbox_resume_s: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return statistics.median(self.hangar_start_s) / statistics.median(self.plain_qemu_s)

    @property
    def resume_ratio(self) -> float:
        return statistics.median(self.resume_s) / statistics.median(self.plain_qemu_s)

    @property
    def sandbox_ratio(self) -> float:
        """A sandbox's restore against its start from stopped (medians)."""
        return statistics.median(self.sandbox_resume_s) / statistics.median(self.sandbox_start_s)

    def report(self) -> str:
        rows = [
            ("(a) plain QEMU, exec to init-ready", self.plain_qemu_s),
            ("(b) hangar start (stopped machine) to started+ready", self.hangar_start_s),
            ("(c) hangar create to started+ready (cached image)", self.hangar_create_s),
            (
                f"(d) hangar start of a suspended machine ({self.resume_path}) to a new line",
                self.resume_s,
            ),
            ("(e) sandbox (runsc) start of a stopped machine to a line", self.sandbox_start_s),
            ("(f) sandbox start of a suspended machine to a new line", self.sandbox_resume_s),
        ]
        lines = [f"{'path':<62} {'median':>8} {'min':>8} {'max':>8}  runs"]
        for label, samples in rows:
            if not samples:
                continue
            lines.append(
                f"{label:<62} {statistics.median(samples):>7.3f}s {min(samples):>7.3f}s "
                f"{max(samples):>7.3f}s  {len(samples)}"
            )
        lines.append(f"ratio hangar/qemu: {self.ratio:.2f}")
        if self.resume_s:
            lines.append(f"ratio resume/qemu: {self.resume_ratio:.2f}")
        if self.sandbox_start_s and self.sandbox_resume_s:
            lines.append(f"ratio sandbox resume/start: {self.sandbox_ratio:.2f}")
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


def _new_line_after(path: Path, offset: int) -> bool:
    """Has a whole line begun at or after ``offset`` of ``path``? (A line the guest had
    begun before does not count.)"""
    with path.open("rb") as file:
        if offset == 0:
            return b"\n" in file.read()
        file.seek(offset - 1)
        # From the end of the last line before offset.
        return b"\n" in file.read().partition(b"\n")[2]


class ApiResume:
    """(d) through the API, on a machine of its own (the ticker): booted once, suspended, then
    each :meth:`measure` starts it (timed until the guest prints a new line) and suspends it
    again. ``between="stop"``: stopped instead, so each start is a cold one (row e);
    ``ready``: what its console shows once it runs (a sandbox has no init of hangar's)."""

    path = "API"

    def __init__(
        self,
        api: httpx.Client,
        home: Path,
        config: Mapping[str, object],
        *,
        ready: bytes = READY_LINE,
        between: str = "suspend",
    ) -> None:
        self._api = api
        self._home = home
        self._config = config
        self._ready = ready
        self._between = between
        self._path = ""
        self._console = Path()

    async def prepare(self) -> None:
        created = self._api.post(f"/v1/apps/{APP}/machines", json={"config": self._config})
        created.raise_for_status()
        machine_id = created.json()["id"]
        self._path = f"/v1/apps/{APP}/machines/{machine_id}"
        self._console = self._home / "machines" / machine_id / RunDir.CONSOLE_LOG
        _wait_state(self._api, self._path, "started")
        _wait_for_bytes(self._console, self._ready, time.monotonic() + TIMEOUT_S)
        self._suspend()

    def _suspend(self) -> None:
        self._api.post(f"{self._path}/{self._between}").raise_for_status()
        _wait_state(self._api, self._path, "suspended" if self._between == "suspend" else "stopped")

    async def measure(self) -> float:
        offset = self._console.stat().st_size
        started = time.monotonic()
        self._api.post(f"{self._path}/start").raise_for_status()
        while not _new_line_after(self._console, offset):
            if time.monotonic() > started + TIMEOUT_S:
                raise TimeoutError("the resumed guest printed nothing")
            await asyncio.sleep(POLL_S)
        elapsed = time.monotonic() - started
        _wait_state(self._api, self._path, "started")
        self._suspend()
        return elapsed

    async def close(self) -> None:
        if self._path:
            self._api.delete(self._path, params={"kill": "true"}).raise_for_status()
            _wait_state(self._api, self._path, "destroyed")


def sandbox_runtime_installed() -> bool:
    """Whether the server will find gVisor's runsc (as the settings name it)."""
    configured = Settings().runsc
    return shutil.which(str(configured) if configured is not None else "runsc") is not None


def run_boot_bench(image: str, runs: int, home: Path) -> BootBenchResult:
    result = BootBenchResult([], [], [])
    with ServerProcess(home) as server, server.client() as api:
        api.post("/v1/apps", json={"app_name": APP})
        config = {
            "image": image,
            "init": {"cmd": TICKER},
            "restart": {"policy": "no"},
            "stop_config": {"timeout": "1s"},
        }
        created = api.post(f"/v1/apps/{APP}/machines", json={"config": config})
        created.raise_for_status()
        machine_id = created.json()["id"]
        path = f"/v1/apps/{APP}/machines/{machine_id}"
        run_dir = home / "machines" / machine_id
        console = run_dir / RunDir.CONSOLE_LOG
        _wait_state(api, path, "started")
        _wait_for_bytes(console, READY_LINE, time.monotonic() + TIMEOUT_S)
        kernel = _kernel_of(run_dir)
        # The plain row runs QEMU by itself: its console and control port are files.
        spec = _copy_of_machine(run_dir, kernel, home, "plain-qemu", channel_sockets=False)
        api.post(f"{path}/stop").raise_for_status()
        _wait_state(api, path, "stopped")
        # Each run measures every row, so that all see the host alike.
        resume = ApiResume(api, home, config)
        result.resume_path = resume.path
        sandbox = {**config, "guest": {"tier": "sandbox"}}
        sandboxes = (
            [
                ApiResume(api, home, sandbox, ready=b"tick", between="stop"),
                ApiResume(api, home, sandbox, ready=b"tick"),
            ]
            if sandbox_runtime_installed()
            else []
        )
        with asyncio.Runner() as runner:
            try:
                for measured in (resume, *sandboxes):
                    runner.run(measured.prepare())
                for _ in range(runs):
                    _one_run(api, path, console, config, home, spec, result)
                    result.resume_s.append(runner.run(resume.measure()))
                    if sandboxes:
                        result.sandbox_start_s.append(runner.run(sandboxes[0].measure()))
                        result.sandbox_resume_s.append(runner.run(sandboxes[1].measure()))
            finally:
                for measured in (resume, *sandboxes):
                    runner.run(measured.close())
        api.delete(path, params={"force": "true"}).raise_for_status()
        _wait_state(api, path, "destroyed")
        shutil.rmtree(spec.run_dir, ignore_errors=True)
    return result


def _one_run(
    api: httpx.Client,
    path: str,
    console: Path,
    config: Mapping[str, object],
    home: Path,
    spec: VmSpec,
    result: BootBenchResult,
) -> None:
    """One sample of (a), (b) and (c): ``path`` is the stopped machine, ``spec`` a copy of
    its files for plain QEMU."""
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
    fresh_console = home / "machines" / fresh.json()["id"] / RunDir.CONSOLE_LOG
    _wait_for_bytes(fresh_console, READY_LINE, started + TIMEOUT_S)
    result.hangar_create_s.append(time.monotonic() - started)
    api.delete(fresh_path, params={"force": "true"}).raise_for_status()
    _wait_state(api, fresh_path, "destroyed")


def _copy_of_machine(
    run_dir: Path, kernel: Path, home: Path, machine_id: str, channel_sockets: bool = True
) -> VmSpec:
    """A spec booting a copy of the machine's root disk (an overlay over the same cached
    image) and initrd, in a folder of its own."""
    folder = Path(tempfile.mkdtemp(prefix=f"{machine_id}-", dir=home))
    for name in RunDir.BOOT_FILES:
        shutil.copyfile(run_dir / name, folder / name)
    return VmSpec.in_run_dir(
        machine_id=machine_id,
        run_dir=folder,
        kernel=kernel,
        initrd=folder / RunDir.INITRD,
        root_disk=folder / RunDir.ROOT_DISK,
        channel_sockets=channel_sockets,
    )


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
