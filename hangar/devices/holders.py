"""Who holds a device node open: the NVIDIA nodes of a GPU, or a VFIO group.

Checked before anything that waits on those holders. The nvidia driver's unbind does not
fail while a process has the GPU open: it waits, forever (nvidia-persistenced, DCGM and
every NVML user hold ``/dev/nvidiaN``). And a VFIO group's devices may be reset and
returned only once no process (the tenant's QEMU above all) has ``/dev/vfio/<group>`` open.

Holders are found as ``fuser`` finds them: the ``/proc/PID/fd`` links that name the node.
A GPU's minor number comes from the driver's ``/proc/driver/nvidia/gpus/<BDF>/information``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from hangar.devices.hostpaths import HostPaths

NVIDIA_CONTROL_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")


class DeviceHolder(BaseModel):
    model_config = ConfigDict(frozen=True)

    pid: int
    command: str
    node: str
    """The node it holds, as the process sees it (``/dev/nvidia0``)."""

    def describe(self) -> str:
        return f"{self.command} (pid {self.pid}) holds {self.node}"


def nvidia_minor(paths: HostPaths, bdf: str) -> int | None:
    """The GPU's minor number under the host's nvidia driver; None when it has none."""
    if paths.proc is None:
        return None
    information = paths.proc / "driver/nvidia/gpus" / bdf / "information"
    try:
        text = information.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "Device Minor" and value.strip().isdigit():
            return int(value.strip())
    return None


def nvidia_gpu_nodes(paths: HostPaths, bdf: str) -> list[str]:
    minor = nvidia_minor(paths, bdf)
    return [] if minor is None else [f"/dev/nvidia{minor}"]


def holders_of(paths: HostPaths, nodes: Iterable[str]) -> list[DeviceHolder]:
    """Processes with any of ``nodes`` open, by pid. Processes that vanish while being read,
    or whose descriptors this process may not read, are skipped."""
    wanted = set(nodes)
    if not wanted or paths.proc is None:
        return []
    found: list[DeviceHolder] = []
    for entry in sorted(_pids(paths.proc)):
        fd_dir = paths.proc / str(entry) / "fd"
        try:
            descriptors = os.listdir(fd_dir)
        except OSError:
            continue
        held: set[str] = set()
        for descriptor in descriptors:
            try:
                target = os.readlink(fd_dir / descriptor)
            except OSError:
                continue
            if target in wanted:
                held.add(target)
        if held:
            command = _command(paths.proc / str(entry))
            found.extend(DeviceHolder(pid=entry, command=command, node=node) for node in held)
    return sorted(found, key=lambda holder: (holder.pid, holder.node))


def nvidia_holders(paths: HostPaths, bdf: str) -> list[DeviceHolder]:
    """Processes that keep the host's nvidia driver from letting go of this GPU."""
    return holders_of(paths, nvidia_gpu_nodes(paths, bdf))


def vfio_group_holders(paths: HostPaths, group: int) -> list[DeviceHolder]:
    """Processes with the VFIO group open (the legacy group node)."""
    return holders_of(paths, [f"/dev/vfio/{group}"])


def _pids(proc: Path) -> list[int]:
    try:
        return [int(name) for name in os.listdir(proc) if name.isdigit()]
    except OSError:
        return []


def _command(process_dir: Path) -> str:
    try:
        return (process_dir / "comm").read_text(errors="replace").strip() or "?"
    except OSError:
        return "?"
