"""What the agent's steps act on besides the machine store: this host's guest platform, its
run directories, its claims (through the scheduler), its GPUs, its private network, its
volumes and the apps' secrets. Plans build each step with the parts it needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hangar.agent.gpus import HostGpus
from hangar.agent.network import MachineNetwork
from hangar.agent.placement import HostPlacement
from hangar.agent.platform import GuestPlatform
from hangar.agent.volumes import HostVolumes
from hangar.model.guest_contract import RunDir
from hangar.store.protocol import GpuStore, SecretStore


@dataclass(frozen=True)
class HostServices:
    platform: GuestPlatform
    machines_dir: Path
    placement: HostPlacement
    gpu_store: GpuStore
    gpus: HostGpus | None = None
    """This host's GPU devices; None where the host has no GPU support configured."""
    network: MachineNetwork | None = None
    """This host's private network; None where machines run without one."""
    secrets: SecretStore | None = None
    """Apps' secrets, for the boots of their machines; None: machines boot without any."""
    volumes: HostVolumes | None = None
    """This host's volumes; None where the host keeps none (a machine that mounts one
    fails to start there)."""

    def run_dir(self, machine_id: str) -> Path:
        return self.machines_dir / machine_id

    def suspend_state(self, machine_id: str) -> Path:
        """Where the machine's suspend snapshot is kept."""
        return self.run_dir(machine_id) / RunDir.SUSPEND_STATE
