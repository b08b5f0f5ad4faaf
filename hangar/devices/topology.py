"""NVLink domains: sets of GPUs on one host that reach each other over NVLink.

NVML's link table is the authority when it is readable: GPUs connected through active
links (directly or through NVSwitches) share a domain. Without NVML, sysfs still shows
an SXM baseboard: its GPUs share a domain (through the board's NVSwitches when sysfs lists
them, by direct links on 4-GPU boards). PCIe cards get no domain from sysfs, since NVLink
bridges between cards are invisible there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

from hangar.model.gpu_kinds import GpuKind

NvlinkSource = Literal["nvml", "sysfs"]


class NvlinkPlacement(BaseModel):
    model_config = ConfigDict(frozen=True)

    domain: str | None = None
    """Same id for GPUs that share NVLink; ``nvlink-<lowest GPU address>``."""
    nvswitches: list[str] = []
    source: NvlinkSource | None = None


def nvlink_domains(
    gpus: Sequence[tuple[str, GpuKind]],
    nvswitches: Sequence[str],
    nvml_peers: Mapping[str, Sequence[str]],
) -> dict[str, NvlinkPlacement]:
    """Placement of every GPU (by address); GPUs without NVLink peers get an empty one."""
    if any(nvml_peers.values()):
        return _domains_from_links([bdf for bdf, _ in gpus], nvml_peers)
    return _domains_from_board(gpus, nvswitches)


def _domains_from_links(
    gpu_bdfs: Sequence[str], peers: Mapping[str, Sequence[str]]
) -> dict[str, NvlinkPlacement]:
    parent: dict[str, str] = {}

    def find(node: str) -> str:
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for gpu, far_ends in peers.items():
        for far_end in far_ends:
            parent[find(gpu)] = find(far_end)

    components: dict[str, list[str]] = {}
    for node in list(parent):
        components.setdefault(find(node), []).append(node)

    gpu_set = set(gpu_bdfs)
    placements = {}
    for bdf in gpu_bdfs:
        if not peers.get(bdf):
            placements[bdf] = NvlinkPlacement()
            continue
        component = components[find(bdf)]
        placements[bdf] = NvlinkPlacement(
            domain="nvlink-" + min(node for node in component if node in gpu_set),
            nvswitches=sorted(node for node in component if node not in gpu_set),
            source="nvml",
        )
    return placements


def _domains_from_board(
    gpus: Sequence[tuple[str, GpuKind]], nvswitches: Sequence[str]
) -> dict[str, NvlinkPlacement]:
    board = sorted(bdf for bdf, kind in gpus if kind.form_factor == "sxm")
    placements = {bdf: NvlinkPlacement() for bdf, _ in gpus}
    if board and (nvswitches or len(board) > 1):
        shared = NvlinkPlacement(
            domain=f"nvlink-{board[0]}", nvswitches=sorted(nvswitches), source="sysfs"
        )
        placements.update({bdf: shared for bdf in board})
    return placements
