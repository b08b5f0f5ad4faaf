"""A sandbox-tier machine's GPU part: placeholder until the slice claims land."""

from __future__ import annotations

from hangar.agent.host import HostServices
from hangar.agent.platform import SandboxGpu


async def sandbox_gpu(host: HostServices, machine_id: str) -> SandboxGpu | None:
    return None
