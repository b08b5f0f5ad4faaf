"""MIG profiles and layouts: how a MIG-capable GPU splits into instances.

A GPU in MIG mode is cut into GPU instances of fixed profiles (``1g.10gb``, ``3g.40gb``...).
A profile takes compute slices (of 7) and memory slices (of 8), and may start only at
certain memory slices; the operator fixes each GPU's layout (the instances it is cut into when
a slice is asked of it), and the scheduler hands out instances of that layout.

The tables follow NVIDIA's MIG user guide for the A100, H100 and H200 families: each family
has the same geometry (7 compute slices, 8 memory slices) and differs only in the memory its
profiles name. A slice's GPU capacity in milli-GPUs is its compute share rounded down
(``1g`` = 142, ``3g`` = 428, ``7g`` = 1000), so the instances of any valid layout never add
up to more than one GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from hangar.errors import InvalidRequest

COMPUTE_SLICES = 7
MEMORY_SLICES = 8
_PROFILE_NAME = re.compile(r"^(\d)g\.(\d+)gb$")


@dataclass(frozen=True, slots=True)
class MigProfile:
    name: str
    compute_slices: int
    memory_slices: int
    starts: tuple[int, ...]
    """Memory slices an instance of this profile may start at."""

    @property
    def milli(self) -> int:
        """GPU capacity the instance holds, in milli-GPUs (its compute share, rounded down)."""
        return profile_milli(self.name)


def _family(memory_gb: tuple[int, int, int, int, int, int]) -> dict[str, MigProfile]:
    """Profiles of one memory size: 1g (one and two memory slices), 2g, 3g, 4g, 7g."""
    one, one_wide, two, three, four, seven = memory_gb
    profiles = (
        MigProfile(f"1g.{one}gb", 1, 1, (0, 1, 2, 3, 4, 5, 6)),
        MigProfile(f"1g.{one_wide}gb", 1, 2, (0, 2, 4, 6)),
        MigProfile(f"2g.{two}gb", 2, 2, (0, 2, 4)),
        MigProfile(f"3g.{three}gb", 3, 4, (0, 4)),
        MigProfile(f"4g.{four}gb", 4, 4, (0,)),
        MigProfile(f"7g.{seven}gb", 7, 8, (0,)),
    )
    return {profile.name: profile for profile in profiles}


_A100_40GB = _family((5, 10, 10, 20, 20, 40))
_GPU_80GB = _family((10, 20, 20, 40, 40, 80))
_H100_94GB = _family((12, 24, 24, 47, 47, 94))
_H200_141GB = _family((18, 35, 35, 71, 71, 141))

MIG_PROFILES: dict[str, dict[str, MigProfile]] = {
    "a100-pcie-40gb": _A100_40GB,
    "a100-sxm4-40gb": _A100_40GB,
    "a100-pcie-80gb": _GPU_80GB,
    "a100-sxm4-80gb": _GPU_80GB,
    "h100-pcie": _GPU_80GB,
    "h100-sxm": _GPU_80GB,
    "h100-nvl": _H100_94GB,
    "h200": _H200_141GB,
    "h200-nvl": _H200_141GB,
}
"""MIG profiles by GPU kind (the kinds of ``hangar.model.gpu_kinds`` that are MIG-capable)."""


def profile_milli(name: str) -> int:
    """Milli-GPUs held by an instance of profile ``name`` (any kind's spelling)."""
    match = _PROFILE_NAME.match(name)
    if match is None or int(match.group(1)) not in (1, 2, 3, 4, COMPUTE_SLICES):
        raise InvalidRequest(
            f"{name!r} is not a MIG profile (like 1g.10gb or 3g.40gb)", field="gpu_slice"
        )
    return int(match.group(1)) * 1000 // COMPUTE_SLICES


def kind_profiles(kind: str) -> dict[str, MigProfile]:
    """The MIG profiles of ``kind``; a clear error for a kind without MIG."""
    profiles = MIG_PROFILES.get(kind)
    if profiles is None:
        raise InvalidRequest(
            f"GPU kind {kind!r} has no MIG profiles; MIG-capable kinds: "
            + ", ".join(sorted(MIG_PROFILES)),
            field="mig_layout",
            kind=kind,
        )
    return profiles


@lru_cache(maxsize=1024)
def check_layout(kind: str, layout: tuple[str, ...]) -> None:
    """Raise ``InvalidRequest`` unless ``layout`` is a set of instances ``kind`` can be cut into
    at once (compute and memory slices, and each profile's allowed start positions)."""
    if not layout:
        return
    profiles = kind_profiles(kind)
    unknown = [name for name in layout if name not in profiles]
    if unknown:
        raise InvalidRequest(
            f"{', '.join(unknown)} not a MIG profile of {kind}; its profiles: "
            + ", ".join(profiles),
            field="mig_layout",
            kind=kind,
        )
    chosen = sorted((profiles[name] for name in layout), key=lambda p: -p.memory_slices)
    if sum(p.compute_slices for p in chosen) > COMPUTE_SLICES or not _placeable(chosen, 0):
        raise InvalidRequest(
            f"MIG layout {'+'.join(layout)} does not fit one {kind} GPU",
            field="mig_layout",
            kind=kind,
        )


def _placeable(profiles: list[MigProfile], used: int) -> bool:
    """Whether ``profiles`` fit in the memory slices not set in the bitmask ``used``."""
    if not profiles:
        return True
    first, rest = profiles[0], profiles[1:]
    for start in first.starts:
        mask = ((1 << first.memory_slices) - 1) << start
        fits = start + first.memory_slices <= MEMORY_SLICES and not used & mask
        if fits and _placeable(rest, used | mask):
            return True
    return False


def parse_layout(text: str) -> tuple[str, ...]:
    """``3g.40gb+2g.20gb+1g.10gb+1g.10gb`` or ``1g.10gbx7`` (commas also separate)."""
    layout: list[str] = []
    for part in re.split(r"[+,]", text):
        part = part.strip()
        if not part:
            continue
        name, times, count = part.partition("x")
        if times and not count.isdigit():
            raise InvalidRequest(f"bad MIG layout part {part!r}", field="mig_layout")
        layout.extend([name.strip()] * (int(count) if times else 1))
    if not layout:
        raise InvalidRequest("a MIG layout names at least one profile", field="mig_layout")
    return tuple(layout)
