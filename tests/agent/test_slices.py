"""Thin GPU slices on a fixture GPU host: MIG instances as NVML reports them become the
host's offered layout, slices and shares are placed through the real scheduler and claim
store, and the container of each gets exactly its part: device nodes, capability files,
environment and MPS limits. The MPS control daemon is a real process: a stand-in script
that makes the control pipe and answers ``quit`` as ``nvidia-cuda-mps-control -f`` does
(no GPU here)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest

from hangar.agent.gpus import HostGpus
from hangar.agent.host import HostServices
from hangar.agent.mps import MpsSupervisor
from hangar.agent.platform import GuestPlatform, SandboxGpu
from hangar.agent.slices import MPS_PIPE_IN_CONTAINER, sandbox_gpu, share_limits, shared_gpus
from hangar.errors import DeviceError, InsufficientCapacity
from hangar.model.config import GuestConfig
from hangar.scheduler.model import GpuMode
from hangar.vmm.container import ContainerSpec, oci_config
from hangar.vmm.driver import VmSpec
from hangar.vmm.sandbox import SandboxDriver, SandboxRuntime, state_root_for
from tests.agent.gpu_fixture import GpuHost
from tests.devices.fake_pynvml import FakeGpu, mig_slices
from tests.devices.gpu_hw import FakeNvmlHost
from tests.devices.sysfs_fixture import HGX_H100_GPUS

MIG_BDF = "0000:18:00.0"
"""The GPU the operator put in MIG mode: 3g.40gb (GI 1) and 1g.10gb (GI 5)."""
UVM_MAJOR, CAPS_MAJOR = 508, 237
CAP_MINORS = {"gi1": 12, "gi1/ci0": 13, "gi5": 48, "gi5/ci0": 49}
GUEST = {"cpus": 1, "memory_mb": 256, "gpu_kind": "h100-sxm"}

MPS_STAND_IN = """
import os, sys
pipe = os.environ["CUDA_MPS_PIPE_DIRECTORY"]
log = os.path.join(os.environ["CUDA_MPS_LOG_DIRECTORY"], "control.log")
def note(text):
    with open(log, "a") as f:
        f.write(text + "\\n")
if sys.argv[1:] == ["-f"]:
    note("start " + os.environ["CUDA_VISIBLE_DEVICES"])
    control = os.path.join(pipe, "control")
    os.mkfifo(control)
    while True:
        with open(control) as fifo:
            if "quit" in fifo.read():
                note("quit")
                os.unlink(control)
                sys.exit(0)
else:  # a client: hand the command to the daemon
    with open(os.path.join(pipe, "control"), "w") as fifo:
        fifo.write(sys.stdin.read())
"""


class MigNvmlHost(FakeNvmlHost):
    """The fixture host's NVML with :data:`MIG_BDF` in MIG mode, cut as ``mig_slices``."""

    def _gpu(self, bdf: str) -> FakeGpu:
        gpu = super()._gpu(bdf)
        if bdf == MIG_BDF:
            gpu.mig_mode = (1, 1)
            gpu.mig_slots = mig_slices()
        return gpu


def write_driver_proc(host: GpuHost) -> None:
    """What the nvidia driver shows in /proc besides its GPUs: the character majors and the
    MIG capabilities of :data:`MIG_BDF` (its minor is 0: the first GPU bound)."""
    proc = host.builder.proc
    (proc / "devices").write_text(
        "Character devices:\n  1 mem\n195 nvidia-frontend\n"
        f"{CAPS_MAJOR} nvidia-caps\n{UVM_MAJOR} nvidia-uvm\n\nBlock devices:\n  8 sd\n"
    )
    caps = proc / "driver/nvidia/capabilities/gpu0/mig"
    for name, minor in CAP_MINORS.items():
        (caps / name).mkdir(parents=True, exist_ok=True)
        (caps / name / "access").write_text(
            f"DeviceFileMinor: {minor}\nDeviceFileMode: 292\nDeviceFileModify: 1\n"
        )


@pytest.fixture
def mig_host(gpu_host: GpuHost) -> GpuHost:
    gpu_host.nvml_host = MigNvmlHost
    write_driver_proc(gpu_host)
    return gpu_host


@pytest.fixture
def mps_control(tmp_path: Path) -> list[str]:
    script = tmp_path / "mps_control.py"
    script.write_text(MPS_STAND_IN)
    return [sys.executable, str(script)]


def host_services(host: GpuHost, gpus: HostGpus, mps: MpsSupervisor | None = None) -> HostServices:
    return HostServices(
        platform=cast(GuestPlatform, object()),
        machines_dir=host.tmp / "machines",
        placement=host.placement,
        gpu_store=host.stores.gpus,
        gpus=gpus,
        mps=mps,
    )


def registered(host: GpuHost) -> HostGpus:
    gpus = host.gpus()
    records = gpus.register(host.stores.gpus)
    host.placement.register(records, fabric_partitions=gpus.fabric_partitions())
    return gpus


def test_nvml_mig_layout_is_offered_and_a_slice_gets_exactly_its_instance(
    mig_host: GpuHost,
) -> None:
    gpus = registered(mig_host)
    [record] = [r for r in mig_host.stores.gpus.list_gpus() if r.bdf == MIG_BDF]
    assert record.mig_layout == ["3g.40gb", "1g.10gb"]
    assert record.available
    mig_gpu = mig_host.placement.gpu(MIG_BDF)
    assert mig_gpu is not None and mig_gpu.mig_layout == ("3g.40gb", "1g.10gb")

    claim = mig_host.placement.place("m-slice", GuestConfig(**GUEST, gpu_slice="1g.10gb"))
    assert claim.gpu_slice == "1g.10gb"
    assert mig_host.placement.claimed_bdfs("m-slice") == [MIG_BDF]
    assert claim.mig_instance == 1
    state = mig_host.placement.current().state
    assert state.gpu_modes[mig_gpu.index] is GpuMode.MIG

    part = asyncio.run(sandbox_gpu(host_services(mig_host, gpus), "m-slice"))
    assert part is not None
    uuid = "MIG-aaaaaaaa-0000-0000-0000-000000000002"
    assert part.env == {"NVIDIA_VISIBLE_DEVICES": uuid, "CUDA_VISIBLE_DEVICES": uuid}
    assert [(d.path, d.major, d.minor) for d in part.devices] == [
        ("/dev/nvidiactl", 195, 255),
        ("/dev/nvidia-uvm", UVM_MAJOR, 0),
        ("/dev/nvidia-uvm-tools", UVM_MAJOR, 1),
        ("/dev/nvidia0", 195, 0),
        ("/dev/nvidia-caps/nvidia-cap48", CAPS_MAJOR, 48),
        ("/dev/nvidia-caps/nvidia-cap49", CAPS_MAJOR, 49),
    ]
    assert [(m.destination, m.read_only) for m in part.mounts] == [
        ("/proc/driver/nvidia/capabilities/gpu0/mig/gi5/access", True),
        ("/proc/driver/nvidia/capabilities/gpu0/mig/gi5/ci0/access", True),
    ]
    assert all(m.source.is_file() for m in part.mounts)

    # The container spec carries exactly those nodes, and its device cgroup allows only them.
    container = ContainerSpec(
        rootfs=mig_host.tmp,
        argv=["nvidia-smi"],
        env=part.env,
        devices=part.devices,
        mounts=part.mounts,
        gpu=True,
    )
    config = oci_config(container, cpus=1, memory_mb=256)
    linux = config["linux"]
    assert [d["path"] for d in linux["devices"]] == [d.path for d in part.devices]
    allowed = [(r["major"], r["minor"]) for r in linux["resources"]["devices"] if r["allow"]]
    assert allowed == [(d.major, d.minor) for d in part.devices]
    assert linux["resources"]["devices"][0] == {"allow": False, "access": "rwm"}
    assert f"CUDA_VISIBLE_DEVICES={uuid}" in config["process"]["env"]
    spec = VmSpec.in_run_dir(
        machine_id="m-slice",
        run_dir=mig_host.tmp / "run",
        kernel=None,
        initrd=None,
        root_disk=mig_host.tmp,
        container=container,
    )
    driver = SandboxDriver(
        binary="runsc", state_root=state_root_for(mig_host.tmp, SandboxRuntime.RUNSC)
    )
    assert "--nvproxy" in driver.global_flags(spec)


def test_the_other_instance_then_none(mig_host: GpuHost) -> None:
    registered(mig_host)
    first = mig_host.placement.place("a", GuestConfig(**GUEST, gpu_slice="3g.40gb"))
    assert first.mig_instance == 0
    mig_host.placement.place("b", GuestConfig(**GUEST, gpu_slice="1g.10gb"))
    with pytest.raises(InsufficientCapacity):
        mig_host.placement.place("c", GuestConfig(**GUEST, gpu_slice="2g.20gb"))
    # A GPU with slices on it serves no whole-GPU machine until every slice is released.
    state = mig_host.placement.current().state
    index = next(gpu.index for gpu in state.gpus if gpu.bdf == MIG_BDF)
    assert state.free_instances(index) == ()


def test_a_gpu_in_mig_mode_is_refused_whole_at_placement_not_at_start(mig_host: GpuHost) -> None:
    """Whole-GPU machines fill every other GPU and are then refused by placement, naming the
    GPU in MIG mode; it never reaches ClaimGpuGroups as a whole GPU, and still takes slices."""
    registered(mig_host)
    state = mig_host.placement.current().state
    mig_gpu = next(gpu for gpu in state.gpus if gpu.bdf == MIG_BDF)
    assert mig_gpu.mig_fixed and MIG_BDF not in {
        state.gpus[i].bdf for i in state.whole_free_indexes()
    }
    placed: list[str] = []
    with pytest.raises(InsufficientCapacity) as refused:
        for n in range(len(state.gpus)):
            mig_host.placement.place(f"w{n}", GuestConfig(**GUEST, gpus=1, cpu_kind="performance"))
            placed.extend(mig_host.placement.claimed_bdfs(f"w{n}"))
    assert len(placed) == len(state.whole_free_indexes()) and MIG_BDF not in placed
    assert refused.value.fields["mig_mode_gpus"] == [MIG_BDF]
    assert refused.value.fields["free_gpus"] == 0
    assert f"slices only: {MIG_BDF}" in refused.value.message
    claim = mig_host.placement.place("m", GuestConfig(**GUEST, gpu_slice="1g.10gb"))
    assert mig_host.placement.claimed_bdfs("m") == [MIG_BDF] and claim.gpu_slice == "1g.10gb"


def test_a_mig_instance_that_changed_under_a_claim_is_refused(mig_host: GpuHost) -> None:
    gpus = registered(mig_host)
    mig_host.placement.place("m", GuestConfig(**GUEST, gpu_slice="1g.10gb"))

    class Recut(MigNvmlHost):
        def _gpu(self, bdf: str) -> FakeGpu:
            gpu = super()._gpu(bdf)
            if bdf == MIG_BDF:
                gpu.mig_slots = gpu.mig_slots[:1]  # the operator removed the 1g.10gb instance
            return gpu

    mig_host.nvml_host = Recut
    with pytest.raises(DeviceError, match="no longer has MIG instance 1"):
        asyncio.run(sandbox_gpu(host_services(mig_host, mig_host.gpus()), "m"))
    del gpus


def test_shares_get_mps_limits_and_one_daemon_per_gpu(
    mig_host: GpuHost, mps_control: list[str], tmp_path: Path
) -> None:
    gpus = registered(mig_host)
    mps = MpsSupervisor(tmp_path / "mps", control=mps_control)
    host = host_services(mig_host, gpus, mps)
    for machine in ("s1", "s2"):
        mig_host.placement.place(machine, GuestConfig(**GUEST, gpu_share=0.5))
    [bdf] = set(mig_host.placement.claimed_bdfs("s1")) | set(mig_host.placement.claimed_bdfs("s2"))
    assert bdf in HGX_H100_GPUS and bdf != MIG_BDF

    async def both() -> list[SandboxGpu | None]:
        return [await sandbox_gpu(host, "s1"), await sandbox_gpu(host, "s2")]

    parts = asyncio.run(both())
    daemon = mps.daemon(bdf)
    assert daemon is not None
    uuid = daemon.gpu_uuid
    for part in parts:
        assert part is not None
        env = part.env
        assert env["CUDA_VISIBLE_DEVICES"] == uuid == env["NVIDIA_VISIBLE_DEVICES"]
        assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50"
        assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=40960M"  # half of 80 GiB
        assert env["CUDA_MPS_PIPE_DIRECTORY"] == MPS_PIPE_IN_CONTAINER
        [mount] = part.mounts
        assert mount.source == mps.pipe_dir(bdf) and not mount.read_only
        paths = [d.path for d in part.devices]
        assert not any("nvidia-caps" in path for path in paths)
    log = (mps.log_dir(bdf) / "control.log").read_text().splitlines()
    assert log == [f"start {uuid}"], "one daemon for the GPU's two shares"
    assert shared_gpus(host) == {bdf: uuid}

    # The daemon dies under its shares: supervision starts it again.
    os.kill(daemon.pid, signal.SIGKILL)
    _wait(lambda: mps.daemon(bdf) is None)
    asyncio.run(mps.supervise(lambda: shared_gpus(host)))
    again = mps.daemon(bdf)
    assert again is not None and again.pid != daemon.pid

    # Every share released: supervision stops it with its quit command.
    for machine in ("s1", "s2"):
        mig_host.placement.release(machine)
    asyncio.run(mps.supervise(lambda: shared_gpus(host)))
    assert mps.daemon(bdf) is None
    assert (mps.log_dir(bdf) / "control.log").read_text().splitlines()[-1] == "quit"
    asyncio.run(mps.stop(bdf))  # idempotent


def test_share_limits_round_down_and_keep_one_percent() -> None:
    assert share_limits(250, 80 * 1024**3) == {
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25",
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=20480M",
    }
    assert share_limits(1, 80 * 1024**3)["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "1"


def test_a_share_without_mps_on_the_host_is_refused(mig_host: GpuHost) -> None:
    gpus = registered(mig_host)
    mig_host.placement.place("s", GuestConfig(**GUEST, gpu_share=0.25))
    with pytest.raises(DeviceError, match="runs no MPS"):
        asyncio.run(sandbox_gpu(host_services(mig_host, gpus), "s"))


def test_a_daemon_that_never_makes_its_pipe_fails_cleanly(tmp_path: Path) -> None:
    mps = MpsSupervisor(tmp_path / "mps", control=[sys.executable, "-c", "import sys; sys.exit(3)"])
    with pytest.raises(DeviceError, match="did not start"):
        asyncio.run(mps.ensure("0000:18:00.0", "GPU-x"))
    assert mps.daemon("0000:18:00.0") is None


def _wait(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
