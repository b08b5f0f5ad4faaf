"""The MPS part of ``make gpu-check``: GPU time shares as hangar runs them, on a real GPU.

It starts an MPS control daemon on the first GPU that is not in MIG mode (hangar's
``MpsSupervisor``, a pipe folder of its own), runs two sandbox machines with a 0.5 share
each (hangar's ``SandboxDriver`` with the GPU part ``share_part`` builds: the GPU's nodes,
the daemon's pipes, ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` and
``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT``), in which a PyTorch workload allocates GPU memory up to
80 % of its cap and runs a short matrix product; then machine A asks for more than its cap
(which must fail inside A) and machine B computes again afterwards (which must still work);
then it stops MPS. The machines' root is this host's own root, read-only (it has CUDA and
PyTorch), with the workload bound in.

It changes no GPU setting: no MIG change, no compute-mode change, no reset, no unbinding;
MPS runs only for the check and is stopped at its end. Runtimes are tried in order: gVisor's
runsc (its nvproxy), then runc where it is installed (what an operator would enable with
``HANGAR_SANDBOX_RUNTIME=runc``); the output says which ran the machines.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from hangar.agent.mps import MPS_CONTROL, MpsSupervisor
from hangar.agent.slices import share_part
from hangar.devices.hostpaths import HostPaths
from hangar.devices.inventory import Gpu, HostInventory
from hangar.errors import HangarError
from hangar.vmm.container import ContainerMount, ContainerSpec
from hangar.vmm.driver import VmSpec
from hangar.vmm.sandbox import SandboxDriver, SandboxRuntime, SandboxTimeouts, runtime_error

SHARE_MILLI = 500
FILL_FRACTION = 0.8
WORKLOAD_TIMEOUT_S = 240.0
REPO_ROOT = Path(__file__).resolve().parent.parent
PASSED_ENV = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "HOME", "CUDA_HOME")

WORKLOAD = r"""
import json, os, sys, time
role = sys.argv[1]
check = "/check"
def say(**fields):
    print(json.dumps({"role": role, **fields}), flush=True)
try:
    import torch
except Exception as error:
    say(phase="import", ok=False, error=repr(error)); sys.exit(2)
limit = os.environ["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"]
cap_mib = int(limit.split("=")[1].rstrip("M"))
say(phase="env", cap_mib=cap_mib, threads=os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"],
    visible=os.environ.get("CUDA_VISIBLE_DEVICES"))
device = torch.device("cuda:0")
chunk = 256
held, allocated = [], 0
target = int(cap_mib * float(sys.argv[2]))
try:
    while allocated + chunk <= target:
        held.append(torch.empty(chunk * 2**20, dtype=torch.uint8, device=device))
        allocated += chunk
    a = torch.randn(2048, 2048, device=device)
    b = (a @ a).sum().item()
    torch.cuda.synchronize()
    say(phase="within_cap", ok=True, allocated_mib=allocated, checksum=b)
except Exception as error:
    say(phase="within_cap", ok=False, allocated_mib=allocated, error=str(error)[:300])
    sys.exit(3)
if role == "A":
    extra = cap_mib - allocated + 2048
    try:
        held.append(torch.empty(extra * 2**20, dtype=torch.uint8, device=device))
        torch.cuda.synchronize()
        say(phase="beyond_cap", refused=False, extra_mib=extra)
    except Exception as error:
        say(phase="beyond_cap", refused=True, extra_mib=extra, error=str(error)[:300])
    open(os.path.join(check, "a.done"), "w").close()
else:
    deadline = time.monotonic() + 120
    while not os.path.exists(os.path.join(check, "a.done")) and time.monotonic() < deadline:
        time.sleep(0.05)
    a = torch.randn(2048, 2048, device=device)
    b = (a @ a).sum().item()
    torch.cuda.synchronize()
    say(phase="after_a_refused", ok=True, checksum=b)
"""


@dataclass
class MpsReport:
    runtime: str = ""
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str = ""


def _binary(name: str, env_var: str) -> str | None:
    configured = os.environ.get(env_var)
    candidates = [configured] if configured else []
    candidates += [str(REPO_ROOT / ".cache" / name / "bin" / name), name]
    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def runtimes() -> list[tuple[SandboxRuntime, str]]:
    found = []
    runsc = _binary("runsc", "HANGAR_RUNSC")
    if runsc:
        found.append((SandboxRuntime.RUNSC, runsc))
    runc = _binary("runc", "HANGAR_RUNC")
    if runc:
        found.append((SandboxRuntime.RUNC, runc))
    return found


def pick_gpu(inventory: HostInventory) -> Gpu | None:
    """The first GPU NVML sees whole (not in MIG mode), with its UUID and memory."""
    for gpu in inventory.gpus:
        if gpu.mig_mode != "enabled" and gpu.uuid and gpu.memory_total_bytes:
            return gpu
    return None


def _events(console_log: Path) -> list[dict[str, Any]]:
    events = []
    try:
        lines = console_log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                events.append(value)
    return events


async def _run_pair(
    runtime: SandboxRuntime, binary: str, gpu: Gpu, pipe: Path, work: Path
) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Machines A and B on ``runtime``: their JSON lines, and problems met."""
    state_root = work / f"state-{runtime.value}"
    driver = SandboxDriver(
        binary=binary,
        state_root=state_root,
        runtime=runtime,
        timeouts=SandboxTimeouts(launch_s=120),
    )
    check_dir = work / f"check-{runtime.value}"
    check_dir.mkdir()
    (check_dir / "workload.py").write_text(WORKLOAD)
    part = share_part(HostPaths.real(), gpu, SHARE_MILLI, pipe)
    env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
    handles = {}
    problems: list[str] = []
    specs = {}
    for role in ("A", "B"):
        machine_id = f"mpscheck{role.lower()}{runtime.value}"
        container = ContainerSpec(
            rootfs=Path("/"),
            read_only_root=True,
            argv=["python3", "/check/workload.py", role, str(FILL_FRACTION)],
            env={**env, **part.env},
            hostname=machine_id,
            devices=part.devices,
            mounts=[
                *part.mounts,
                ContainerMount(source=check_dir, destination="/check", read_only=False),
            ],
            gpu=True,
        )
        run_dir = work / machine_id
        spec = VmSpec.in_run_dir(
            machine_id=machine_id,
            run_dir=run_dir,
            kernel=None,
            initrd=None,
            root_disk=Path("/"),
            cpus=2,
            memory_mb=16384,
            container=container,
        )
        specs[role] = spec
        try:
            handles[role] = await driver.launch(spec)
        except HangarError as error:
            problems.append(f"machine {role} did not start under {runtime.value}: {error}")
    deadline = asyncio.get_running_loop().time() + WORKLOAD_TIMEOUT_S
    for role, handle in handles.items():
        while driver.is_running(handle):
            if asyncio.get_running_loop().time() > deadline:
                problems.append(f"machine {role} ran past {WORKLOAD_TIMEOUT_S:g} s")
                break
            await asyncio.sleep(0.2)
    for handle in handles.values():
        await driver.kill(handle)
    output = {role: _events(specs[role].console_log) for role in specs}
    for role, spec in specs.items():
        failure = runtime_error(spec.vmm_log)
        if failure:
            problems.append(f"{runtime.value} said for machine {role}: {failure}")
    shutil.rmtree(state_root, ignore_errors=True)
    return output, problems


def judge(output: dict[str, list[dict[str, Any]]]) -> tuple[list[str], list[str]]:
    """Failures and notes from the machines' JSON lines."""
    failures: list[str] = []
    notes: list[str] = []

    def phase(role: str, name: str) -> dict[str, Any] | None:
        return next((e for e in output.get(role, []) if e.get("phase") == name), None)

    for role in ("A", "B"):
        env = phase(role, "env")
        within = phase(role, "within_cap")
        if env is not None:
            notes.append(
                f"machine {role}: cap {env.get('cap_mib')} MiB, {env.get('threads')} % of the "
                f"SMs, device {env.get('visible')}"
            )
        if within is None or not within.get("ok"):
            failures.append(
                f"machine {role} could not allocate and compute within its cap: {within}"
            )
        else:
            notes.append(f"machine {role}: {within['allocated_mib']} MiB held, matmul ok")
    beyond = phase("A", "beyond_cap")
    if beyond is None:
        failures.append("machine A never tried to pass its cap")
    elif not beyond.get("refused"):
        failures.append(f"machine A allocated {beyond.get('extra_mib')} MiB past its cap")
    else:
        error = str(beyond.get("error", ""))[:120]
        notes.append(f"machine A: {beyond['extra_mib']} MiB past its cap refused ({error})")
    after = phase("B", "after_a_refused")
    if after is None or not after.get("ok"):
        failures.append(f"machine B did not compute after A's refused allocation: {after}")
    else:
        notes.append("machine B computed again after A's refusal: only A was refused")
    return failures, notes


async def mps_check(inventory: HostInventory) -> MpsReport:
    report = MpsReport()
    gpu = pick_gpu(inventory)
    if gpu is None:
        report.skipped = "no GPU outside MIG mode with an NVML UUID and memory"
        return report
    control = shutil.which(MPS_CONTROL)
    if control is None:
        report.skipped = f"{MPS_CONTROL} is not installed"
        return report
    found = runtimes()
    if not found:
        report.skipped = "no sandbox runtime (runsc or runc): run `make runsc`"
        return report
    work = Path(tempfile.mkdtemp(prefix="hangar-mps-check-"))
    mps = MpsSupervisor(work / "mps", control=[control])
    try:
        pipe = await mps.ensure(gpu.bdf, gpu.uuid or "")
        report.notes.append(f"MPS control daemon up for {gpu.bdf} ({gpu.uuid}), pipes {pipe}")
        for runtime, binary in found:
            output, problems = await _run_pair(runtime, binary, gpu, pipe, work)
            failures, notes = judge(output)
            if not failures:
                report.runtime = runtime.value
                report.notes += notes + problems
                return report
            report.notes.append(f"{runtime.value}: " + "; ".join(problems + failures)[:1500])
        report.failures.append("no sandbox runtime ran the two shares as required (see notes)")
        return report
    except HangarError as error:
        report.failures.append(f"MPS: {error}")
        return report
    finally:
        try:
            await mps.stop(gpu.bdf)
            report.notes.append("MPS control daemon stopped")
        except HangarError as error:
            report.failures.append(f"MPS would not stop: {error}")
        shutil.rmtree(work, ignore_errors=True)


def print_report(console: Console, report: MpsReport) -> int:
    """Print the MPS part; the number of failures."""
    if report.skipped:
        console.print(f"[yellow]skip[/yellow] MPS shares: {report.skipped}")
        return 0
    verdict = "[red]FAIL[/red]" if report.failures else "[green]ok[/green]"
    runtime = f" under {report.runtime}" if report.runtime else ""
    console.print(f"{verdict} MPS shares: two 0.5-share sandbox machines{runtime}")
    for failure in report.failures:
        console.print(f"    [red]failure:[/red] {failure}")
    for note in report.notes:
        console.print(f"    [yellow]note:[/yellow] {note}")
    return len(report.failures)


def run(inventory: HostInventory, console: Console, argv: Sequence[str] = ()) -> int:
    return print_report(console, asyncio.run(mps_check(inventory)))
