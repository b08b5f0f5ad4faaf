"""A VMM stand-in for GPU machine tests on hosts without an IOMMU or a GPU.

QEMU cannot open a VFIO device that the kernel does not have (nor run KVM here), so for the
path where a GPU machine is *running* these tests use the real platform for everything but
the process: the QEMU command line is still built by the real driver (and kept in
``argv.json`` for the test to read), and a plain ``sleep`` process stands in for the QEMU
that would run it. Where the guest's firmware puts each GPU is what it does for hangar's
layout in ``tests/vmm/test_gpu_topology.py``: root ports behind the expander at bus 0x80,
the GPU behind port ``i`` on bus ``0x81 + i``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from hangar.agent.guest import QemuGuestPlatform
from hangar.agent.platform import GpuBoot, GuestExit, GuestNetwork, VmHandleData
from hangar.model.machine import Machine
from hangar.vmm.driver import VolumeDiskSpec
from hangar.vmm.proc import read_process

ARGV_FILE = "argv.json"


class SleepingVmmPlatform(QemuGuestPlatform):
    async def launch(
        self,
        machine: Machine,
        run_dir: Path,
        gpus: GpuBoot | None,
        network: GuestNetwork | None = None,
        volumes: Sequence[VolumeDiskSpec] = (),
    ) -> VmHandleData:
        spec = await self.vm_spec(machine, run_dir, gpus, network, volumes)
        (run_dir / ARGV_FILE).write_text(json.dumps(self.driver.prepare(spec)))
        process = subprocess.Popen(["sleep", "3600"], start_new_session=True)
        info = read_process(process.pid)
        assert info is not None
        return {"pid": process.pid, "start_time": info.start_time}

    async def gpu_addresses(
        self, handle: VmHandleData, device_ids: Mapping[str, str]
    ) -> dict[str, str]:
        found = {}
        for device_id, bdf in device_ids.items():
            gpu, _, function = device_id.removeprefix("gpu").partition("-f")
            found[f"0000:{0x81 + int(gpu):02x}:00.{function or 0}"] = bdf
        return found

    async def alive(self, handle: VmHandleData) -> bool:
        return self.running(handle)

    def running(self, handle: VmHandleData) -> bool:
        info = read_process(int(handle["pid"]))
        return info is not None and not info.exited and info.start_time == handle["start_time"]

    async def stop(self, handle: VmHandleData, timeout_s: float, signum: int) -> None:
        await self.kill(handle)

    async def kill(self, handle: VmHandleData) -> None:
        if await self.alive(handle):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(handle["pid"]), signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(handle["pid"]), 0)

    async def guest_exit(self, handle: VmHandleData) -> GuestExit:
        return GuestExit(exit_code=None, guest_error="stand-in VMM killed")

    def vmm_processes(self, machines_dir: Path) -> dict[int, str]:
        return {}
