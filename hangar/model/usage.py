"""Metered usage: intervals of a machine running (or a volume existing), and what they cost.

An interval is one boot of one machine (or one size of one volume) with the resources it
held: it opens when the machine starts, its ``until`` moves forward at each checkpoint the
agent writes, and it closes when the machine stops. Usage over a window is the overlap of
the intervals with it, to the second; cost is that time at the operator's prices.
"""

from __future__ import annotations

import enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from hangar.errors import InvalidRequest

SECONDS_PER_HOUR = 3600.0
MIB_PER_GB = 1024.0


class UsageSubject(enum.StrEnum):
    MACHINE = "machine"
    VOLUME = "volume"


class UsageInterval(BaseModel):
    """One boot of a machine (or one size of a volume) and the resources it held."""

    model_config = ConfigDict(frozen=True)

    id: str
    """Deterministic from what it meters (the boot's VMM identity, the volume and its size),
    so opening it again after a crash is a no-op."""
    subject: UsageSubject
    org: str
    app: str
    machine_id: str = ""
    volume_id: str = ""
    host: str
    region: str
    cpu_kind: str = ""
    cpus: int = 0
    memory_mb: int = 0
    gpu_kind: str = ""
    gpus: float = 0.0
    """Whole GPUs held, or the fraction of one GPU a slice holds."""
    volume_gb: float = 0.0
    started_at: float
    until: float
    """The last moment it was known to be in use (a checkpoint), or its end once closed."""
    closed: bool = False

    def seconds_within(self, start: float, end: float) -> float:
        """Seconds of this interval inside ``[start, end)``."""
        return max(0.0, min(self.until, end) - max(self.started_at, start))


GroupBy = Literal["app", "machine", "gpu_kind"]
NO_GPU = "none"
"""The ``gpu_kind`` group of machines without a GPU."""


class PriceTable(BaseModel):
    """Prices per hour, in ``currency``: a GPU by kind, a vCPU by CPU kind, a GB of memory,
    a GB of volume. A kind with no price costs nothing and is listed as unpriced."""

    model_config = ConfigDict(frozen=True)

    currency: str = "USD"
    gpu: dict[str, float] = Field(default_factory=dict)
    cpu: dict[str, float] = Field(default_factory=dict)
    memory_gb: float = 0.0
    volume_gb: float = 0.0

    @classmethod
    def parse(cls, text: str, base: PriceTable | None = None) -> PriceTable:
        """``gpu:l40s=1.25,cpu:performance=0.03,memory_gb=0.005,volume_gb=0.0002`` (per
        hour) over ``base``: each item replaces that one price."""
        table = base or cls()
        gpu, cpu = dict(table.gpu), dict(table.cpu)
        memory_gb, volume_gb = table.memory_gb, table.volume_gb
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            name, sep, value = item.partition("=")
            try:
                price = float(value)
            except ValueError:
                price = -1.0
            if not sep or price < 0 or price != price:
                raise InvalidRequest(
                    f"prices: {item!r} is not NAME=PRICE_PER_HOUR (a number >= 0)", field="prices"
                )
            family, _, kind = name.strip().partition(":")
            if family == "gpu" and kind:
                gpu[kind] = price
            elif family == "cpu" and kind:
                cpu[kind] = price
            elif name.strip() == "memory_gb":
                memory_gb = price
            elif name.strip() == "volume_gb":
                volume_gb = price
            else:
                raise InvalidRequest(
                    f"prices: unknown price {name!r} (gpu:KIND, cpu:KIND, memory_gb, volume_gb)",
                    field="prices",
                )
        return cls(
            currency=table.currency, gpu=gpu, cpu=cpu, memory_gb=memory_gb, volume_gb=volume_gb
        )


# Fly.io's published per-hour GPU prices (its pricing page, "GPUs and Fly GPU Machines",
# 2024-2025); kinds Fly never sold have no default price. Volumes: Fly's $0.15 per GB-month
# (30 days). CPU and memory: hangar's own defaults, of the order of Fly's machine presets.
DEFAULT_PRICES = PriceTable(
    gpu={
        "a10": 1.50,
        "l40s": 1.25,
        "a100-pcie-40gb": 2.50,
        "a100-sxm4-80gb": 3.50,
    },
    cpu={"shared": 0.0028, "performance": 0.0417},
    memory_gb=0.0069,
    volume_gb=0.15 / (30 * 24),
)


class UsageAmounts(BaseModel):
    """Resource-time of a set of intervals and what it costs."""

    seconds: float = 0.0
    """Machine-seconds running (volume intervals add none)."""
    cpu_seconds: float = 0.0
    memory_gb_seconds: float = 0.0
    gpu_seconds: float = 0.0
    volume_gb_seconds: float = 0.0
    cost: float = 0.0

    def add(self, interval: UsageInterval, seconds: float, prices: PriceTable) -> None:
        memory_gb = interval.memory_mb / MIB_PER_GB
        if interval.subject is UsageSubject.MACHINE:
            self.seconds += seconds
        self.cpu_seconds += interval.cpus * seconds
        self.memory_gb_seconds += memory_gb * seconds
        self.gpu_seconds += interval.gpus * seconds
        self.volume_gb_seconds += interval.volume_gb * seconds
        hourly = (
            interval.cpus * prices.cpu.get(interval.cpu_kind, 0.0)
            + memory_gb * prices.memory_gb
            + interval.gpus * prices.gpu.get(interval.gpu_kind, 0.0)
            + interval.volume_gb * prices.volume_gb
        )
        self.cost += hourly * seconds / SECONDS_PER_HOUR

    def rounded(self) -> UsageAmounts:
        return UsageAmounts(
            seconds=round(self.seconds, 3),
            cpu_seconds=round(self.cpu_seconds, 3),
            memory_gb_seconds=round(self.memory_gb_seconds, 3),
            gpu_seconds=round(self.gpu_seconds, 3),
            volume_gb_seconds=round(self.volume_gb_seconds, 3),
            cost=round(self.cost, 6),
        )


def unpriced(interval: UsageInterval, prices: PriceTable) -> list[str]:
    """The resources of ``interval`` that the price table has no price for."""
    missing = []
    if interval.gpus and interval.gpu_kind not in prices.gpu:
        missing.append(f"gpu:{interval.gpu_kind}")
    if interval.cpus and interval.cpu_kind not in prices.cpu:
        missing.append(f"cpu:{interval.cpu_kind}")
    return missing


def group_key(interval: UsageInterval, group_by: GroupBy) -> str:
    if group_by == "app":
        return interval.app
    if group_by == "machine":
        return interval.machine_id or f"volume:{interval.volume_id}"
    return interval.gpu_kind or NO_GPU
