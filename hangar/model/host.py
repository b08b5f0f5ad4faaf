"""A host as the API and the scheduler see it."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel

# Memory kept back for the host itself and the VMM processes' own overhead.
HOST_RESERVED_MEMORY_MB = 512


class HostInfo(BaseModel):
    id: str
    region: str
    cpus: int
    memory_mb: int

    @property
    def allocatable_memory_mb(self) -> int:
        return max(0, self.memory_mb - HOST_RESERVED_MEMORY_MB)


def read_local_host(host_id: str, region: str, meminfo: Path = Path("/proc/meminfo")) -> HostInfo:
    total_kb = 0
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            total_kb = int(line.split()[1])
            break
    return HostInfo(
        id=host_id,
        region=region,
        cpus=os.cpu_count() or 1,
        memory_mb=total_kb // 1024,
    )
