"""A sandbox-tier machine's GPU part, as the container sees it.

A MIG slice is one instance of a GPU the operator put in MIG mode: the container gets the
nvidia control nodes, its GPU's node and the two capability nodes of its instance (the GPU
instance's and the compute instance's ``/dev/nvidia-caps/nvidia-capN``, numbered by the
driver's ``/proc/driver/nvidia/capabilities`` files, which are bound in read-only too), and
``NVIDIA_VISIBLE_DEVICES`` / ``CUDA_VISIBLE_DEVICES`` set to the instance's UUID: nothing of
any other instance.

A time share is an MPS client of its GPU's control daemon (``hangar.agent.mps``): the control
nodes and its GPU's node, the daemon's pipe folder, the GPU's UUID, and the share's limits:
``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` (its share of the SMs) and
``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` (its share of the GPU's memory).
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

from hangar.agent.host import HostServices
from hangar.agent.platform import SandboxGpu
from hangar.devices.holders import nvidia_minor
from hangar.devices.hostpaths import HostPaths
from hangar.devices.inventory import Gpu as InventoryGpu
from hangar.devices.nvml import MigInstance
from hangar.errors import DeviceError, Unprocessable
from hangar.scheduler.model import MILLI_PER_GPU, Claim
from hangar.vmm.container import ContainerDevice, ContainerMount

NVIDIA_MAJOR = 195
NVIDIACTL_MINOR = 255
MPS_PIPE_IN_CONTAINER = "/run/nvidia-mps"
CAPS_PROC_DIR = "driver/nvidia/capabilities"
MIB = 1024 * 1024


def character_majors(proc: Path) -> dict[str, int]:
    """``/proc/devices``' character devices: name -> major."""
    majors: dict[str, int] = {}
    in_character = False
    for line in (proc / "devices").read_text().splitlines():
        if line.startswith("Character devices"):
            in_character = True
        elif line.startswith("Block devices"):
            in_character = False
        elif in_character:
            number, _, name = line.strip().partition(" ")
            if number.isdigit() and name:
                majors[name.strip()] = int(number)
    return majors


def _major(majors: dict[str, int], name: str) -> int:
    if name not in majors:
        raise DeviceError(f"the host has no {name} device (/proc/devices)", device=name)
    return majors[name]


def capability_minor(access_file: Path) -> int:
    """``DeviceFileMinor`` of a MIG capability's ``access`` file."""
    try:
        text = access_file.read_text()
    except OSError as error:
        raise DeviceError(
            f"MIG capability {access_file} is unreadable: {error.strerror or error}",
            path=str(access_file),
        ) from error
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "DeviceFileMinor" and value.strip().isdigit():
            return int(value.strip())
    raise DeviceError(f"MIG capability {access_file} names no minor", path=str(access_file))


def _paths(paths: HostPaths) -> tuple[Path, Path]:
    if paths.proc is None or paths.dev is None:
        raise DeviceError("this host's /proc and /dev are unknown: no GPU parts here")
    return paths.proc, paths.dev


def _gpu_nodes(paths: HostPaths, bdf: str) -> tuple[list[ContainerDevice], int]:
    """The nvidia control nodes and the GPU's own node; the GPU's minor."""
    proc, _ = _paths(paths)
    minor = nvidia_minor(paths, bdf)
    if minor is None:
        raise DeviceError(f"GPU {bdf} is not on the nvidia driver", bdf=bdf)
    majors = character_majors(proc)
    uvm = _major(majors, "nvidia-uvm")
    return [
        ContainerDevice(path="/dev/nvidiactl", major=NVIDIA_MAJOR, minor=NVIDIACTL_MINOR),
        ContainerDevice(path="/dev/nvidia-uvm", major=uvm, minor=0),
        ContainerDevice(path="/dev/nvidia-uvm-tools", major=uvm, minor=1),
        ContainerDevice(path=f"/dev/nvidia{minor}", major=NVIDIA_MAJOR, minor=minor),
    ], minor


def mig_part(paths: HostPaths, bdf: str, instance: MigInstance) -> SandboxGpu:
    """What a MIG slice's container gets: see the module's docstring."""
    proc, _ = _paths(paths)
    if instance.gpu_instance_id is None or instance.compute_instance_id is None:
        raise DeviceError(f"MIG instance {instance.uuid} has no instance ids", bdf=bdf)
    devices, minor = _gpu_nodes(paths, bdf)
    caps_major = _major(character_majors(proc), "nvidia-caps")
    gi = proc / CAPS_PROC_DIR / f"gpu{minor}/mig/gi{instance.gpu_instance_id}"
    ci = gi / f"ci{instance.compute_instance_id}"
    mounts = []
    for access in (gi / "access", ci / "access"):
        cap = capability_minor(access)
        devices.append(
            ContainerDevice(path=f"/dev/nvidia-caps/nvidia-cap{cap}", major=caps_major, minor=cap)
        )
        mounts.append(
            ContainerMount(
                source=access,
                destination="/proc/" + str(access.relative_to(proc)),
                read_only=True,
            )
        )
    return SandboxGpu(
        devices=devices,
        mounts=mounts,
        env={"NVIDIA_VISIBLE_DEVICES": instance.uuid, "CUDA_VISIBLE_DEVICES": instance.uuid},
    )


def share_limits(share_milli: int, memory_total_bytes: int) -> dict[str, str]:
    """MPS limits of a share: its part of the SMs (percent, at least 1) and of the memory
    (MiB, rounded down), for the one device the client sees (device 0)."""
    percent = max(1, share_milli * 100 // MILLI_PER_GPU)
    memory_mib = math.floor(memory_total_bytes * share_milli / MILLI_PER_GPU / MIB)
    return {
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(percent),
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": f"0={memory_mib}M",
    }


def share_part(paths: HostPaths, gpu: InventoryGpu, share_milli: int, pipe_dir: Path) -> SandboxGpu:
    """What a time share's container gets: see the module's docstring."""
    if gpu.uuid is None or gpu.memory_total_bytes is None:
        raise DeviceError(f"NVML does not report GPU {gpu.bdf}'s UUID and memory", bdf=gpu.bdf)
    devices, _ = _gpu_nodes(paths, gpu.bdf)
    return SandboxGpu(
        devices=devices,
        mounts=[
            ContainerMount(source=pipe_dir, destination=MPS_PIPE_IN_CONTAINER, read_only=False)
        ],
        env={
            "NVIDIA_VISIBLE_DEVICES": gpu.uuid,
            "CUDA_VISIBLE_DEVICES": gpu.uuid,
            "CUDA_MPS_PIPE_DIRECTORY": MPS_PIPE_IN_CONTAINER,
            **share_limits(share_milli, gpu.memory_total_bytes),
        },
    )


def mig_instance_of(gpu: InventoryGpu, claim: Claim) -> MigInstance:
    """The MIG instance a slice claim holds: position ``mig_instance`` of the layout NVML
    reports, which must still be of the claimed profile."""
    instances = gpu.mig_instances
    if gpu.mig_mode != "enabled" or not 0 <= claim.mig_instance < len(instances):
        raise DeviceError(
            f"GPU {gpu.bdf} no longer has MIG instance {claim.mig_instance}",
            bdf=gpu.bdf,
            retryable=False,
        )
    instance = instances[claim.mig_instance]
    if instance.gpu_instance_profile != claim.gpu_slice:
        raise DeviceError(
            f"MIG instance {claim.mig_instance} of GPU {gpu.bdf} is now "
            f"{instance.gpu_instance_profile}, not {claim.gpu_slice}",
            bdf=gpu.bdf,
            retryable=False,
        )
    return instance


async def sandbox_gpu(host: HostServices, machine_id: str) -> SandboxGpu | None:
    """The GPU part ``machine_id``'s claim holds on this host, ready for its container; None
    for a claim without GPUs. A share starts its GPU's MPS daemon if it is not running."""
    claim = host.placement.claim_of(machine_id)
    if claim is None or not claim.gpu_indexes:
        return None
    if claim.whole_gpus:
        raise Unprocessable(
            f"machine {machine_id} holds whole GPUs: those boot in a VM, not a sandbox",
            field="config.guest.tier",
        )
    if host.gpus is None:
        raise DeviceError("this host has no GPU support configured", retryable=False)
    bdf = host.placement.gpus()[claim.gpu_indexes[0]].bdf
    inventory = await asyncio.to_thread(host.gpus.inventory)
    gpu = next((item for item in inventory.gpus if item.bdf == bdf), None)
    if gpu is None:
        raise DeviceError(f"GPU {bdf} is not in this host's inventory", bdf=bdf)
    paths = host.gpus.paths
    if claim.gpu_slice:
        return mig_part(paths, bdf, mig_instance_of(gpu, claim))
    if host.mps is None:
        raise DeviceError("this host runs no MPS: GPU shares are not offered", retryable=False)
    if gpu.uuid is None:
        raise DeviceError(f"NVML does not report GPU {bdf}'s UUID", bdf=bdf)
    pipe = await host.mps.ensure(bdf, gpu.uuid)
    return share_part(paths, gpu, claim.gpu_milli, pipe)


def shared_gpus(host: HostServices) -> dict[str, str]:
    """bdf -> UUID of every GPU that time shares hold on this host now (for
    :meth:`hangar.agent.mps.MpsSupervisor.supervise`); UUIDs as the daemons were started."""
    state = host.placement.current().state
    shared: dict[str, str] = {}
    for claim in state.claims:
        if claim.gpu_indexes and not claim.gpu_slice and not claim.whole_gpus:
            bdf = state.gpus[claim.gpu_indexes[0]].bdf
            record = host.mps.recorded(bdf) if host.mps is not None else None
            if record is not None:
                shared[bdf] = record.gpu_uuid
    return shared
