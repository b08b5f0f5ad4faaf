"""What machines add up to against their org's quotas: how many, their memory and their GPUs
by kind. A machine counts with its config until it is destroyed.

The stores keep these sums as counters (one number per name, :meth:`Footprint.counters`),
changed in the same transaction as each machine write, so a quota check reads one org's
counters instead of every machine."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, Field

from hangar.model.config import MachineConfig

MACHINES = "machines"
MEMORY_MB = "memory_mb"
GPUS_PREFIX = "gpus."


class Footprint(BaseModel):
    machines: int = 0
    memory_mb: int = 0
    gpus: dict[str, int] = Field(default_factory=dict)
    """GPU kind -> GPUs of that kind."""

    def add(self, config: MachineConfig, sign: int = 1) -> None:
        """Count (``sign`` 1) or uncount (-1) one machine with ``config``."""
        self.machines += sign
        self.memory_mb += sign * config.guest.memory_mb
        kind, count = config.guest.gpu_kind, config.guest.gpus or 0
        if kind is not None and count:
            self.gpus[kind] = self.gpus.get(kind, 0) + sign * count

    def counters(self) -> dict[str, int]:
        """Flat ``name -> amount`` (``machines``, ``memory_mb``, ``gpus.KIND``), zeros left out."""
        flat = {MACHINES: self.machines, MEMORY_MB: self.memory_mb}
        flat.update({GPUS_PREFIX + kind: count for kind, count in self.gpus.items()})
        return {name: amount for name, amount in flat.items() if amount}

    @classmethod
    def from_counters(cls, counters: Mapping[str, int]) -> Footprint:
        """The inverse of :meth:`counters` (unknown names are ignored)."""
        return cls(
            machines=counters.get(MACHINES, 0),
            memory_mb=counters.get(MEMORY_MB, 0),
            gpus={
                name.removeprefix(GPUS_PREFIX): amount
                for name, amount in sorted(counters.items())
                if name.startswith(GPUS_PREFIX) and amount
            },
        )


def footprint_change(before: MachineConfig | None, after: MachineConfig | None) -> dict[str, int]:
    """The counters' change when a machine counted with ``before`` counts with ``after``
    (None: it does not count, being new, destroyed or gone); only non-zero changes."""
    change = Footprint()
    if before is not None:
        change.add(before, sign=-1)
    if after is not None:
        change.add(after)
    return change.counters()
