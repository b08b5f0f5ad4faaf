"""The host's memory for a GPU machine: free huge pages per NUMA node, honestly counted.

``free_hugepages`` counts pages that are promised to mappings but not yet touched; the
kernel tracks those as ``resv_hugepages``, globally only. So the pages usable on a node
are that node's free pages minus every reservation (a reservation may fall on any node).
Memory is planned on the GPUs' nodes: 1 GiB pages when every node has enough, else 2 MiB
pages, else ordinary 4 KiB pages; anything short of 1 GiB pages carries a ``fallback``
reason the agent records as an event.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from hangar.errors import VmmError
from hangar.vmm.gpu_topology import PAGE_BYTES, MemoryNode, MemoryPlan, PageSize

NODE_DIR = "devices/system/node"
GLOBAL_HUGEPAGES = "kernel/mm/hugepages"
PAGE_DIRS: dict[str, str] = {"1G": "hugepages-1048576kB", "2M": "hugepages-2048kB"}
MAX_PREALLOC_THREADS = 16


class NodePages(BaseModel):
    model_config = ConfigDict(frozen=True)

    node: int
    cpus: list[int]
    free: dict[str, int]
    """Free pages by page size (``1G``, ``2M``), as the node reports them."""


class HostMemory(BaseModel):
    model_config = ConfigDict(frozen=True)

    nodes: dict[int, NodePages]
    reserved: dict[str, int]
    """``resv_hugepages`` by page size: promised but not yet faulted, on any node."""

    def usable(self, node: int, page_size: PageSize) -> int:
        pages = self.nodes[node].free.get(page_size, 0) if node in self.nodes else 0
        return max(0, pages - self.reserved.get(page_size, 0))


def parse_cpulist(text: str) -> list[int]:
    """``0-3,8,10-11`` as the kernel writes CPU lists."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def read_host_memory(sys_root: Path = Path("/sys")) -> HostMemory:
    nodes: dict[int, NodePages] = {}
    node_root = sys_root / NODE_DIR
    for entry in sorted(node_root.glob("node[0-9]*")):
        number = int(entry.name[4:])
        free = {
            size: _read_int(entry / "hugepages" / folder / "free_hugepages")
            for size, folder in PAGE_DIRS.items()
        }
        cpus = parse_cpulist(_read(entry / "cpulist"))
        nodes[number] = NodePages(node=number, cpus=cpus, free=free)
    reserved = {
        size: _read_int(sys_root / GLOBAL_HUGEPAGES / folder / "resv_hugepages")
        for size, folder in PAGE_DIRS.items()
    }
    return HostMemory(nodes=nodes, reserved=reserved)


def plan_guest_memory(
    memory_mb: int, cpus: int, gpu_nodes: Sequence[int | None], host: HostMemory
) -> MemoryPlan:
    """Split ``memory_mb`` and ``cpus`` evenly over the GPUs' host nodes and pick the
    largest page size every node has enough usable pages of."""
    nodes = list(dict.fromkeys(gpu_nodes)) or [None]
    if None in nodes:
        nodes = [None]  # a GPU without NUMA affinity: nothing to bind to
    for node in nodes:
        if node is not None and node not in host.nodes:
            raise VmmError(f"the GPUs' NUMA node {node} is not on this host", numa_node=node)
    sizes = _split(memory_mb, len(nodes))
    vcpus = _split(cpus, len(nodes))
    page_size, fallback = _page_size(nodes, sizes, host)
    first_vcpu = 0
    plan_nodes = []
    for guest_node, (host_node, size_mb, count) in enumerate(zip(nodes, sizes, vcpus, strict=True)):
        host_cpus = host.nodes[host_node].cpus if host_node is not None else []
        plan_nodes.append(
            MemoryNode(
                guest_node=guest_node,
                host_node=host_node,
                size_mb=size_mb,
                host_cpus=host_cpus,
                vcpus=list(range(first_vcpu, first_vcpu + count)),
            )
        )
        first_vcpu += count
    node_cpus = min((len(n.host_cpus) for n in plan_nodes if n.host_cpus), default=1)
    return MemoryPlan(
        page_size=page_size,
        nodes=plan_nodes,
        prealloc_threads=max(1, min(node_cpus, MAX_PREALLOC_THREADS)),
        fallback=fallback,
    )


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if index < extra else 0) for index in range(parts)]


def _page_size(
    nodes: list[int | None], sizes: list[int], host: HostMemory
) -> tuple[PageSize, str | None]:
    shortfalls: list[str] = []
    sizes_to_try: tuple[PageSize, ...] = ("1G", "2M")
    for page_size in sizes_to_try:
        missing = []
        for node, size_mb in zip(nodes, sizes, strict=True):
            page_mb = PAGE_BYTES[page_size] // (1 << 20)
            if size_mb % page_mb:
                missing.append(f"{size_mb} MiB is not a whole number of {page_size} pages")
                continue
            needed = size_mb // page_mb
            usable = (
                host.usable(node, page_size) if node is not None else _any_node(host, page_size)
            )
            if usable < needed:
                where = f"node {node}" if node is not None else "the host"
                reserved = host.reserved.get(page_size, 0)
                missing.append(
                    f"{where} has {usable} usable {page_size} pages"
                    f" ({reserved} reserved subtracted), {needed} needed"
                )
        if not missing:
            return page_size, "; ".join(shortfalls) or None
        shortfalls.append(f"no {page_size} pages: " + "; ".join(missing))
    return "4K", "; ".join(shortfalls) + ": guest memory on 4 KiB pages"


def _any_node(host: HostMemory, page_size: PageSize) -> int:
    return sum(host.usable(node, page_size) for node in host.nodes)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _read_int(path: Path) -> int:
    text = _read(path).strip()
    return int(text) if text.isdigit() else 0
