#!/usr/bin/env python3
"""Check hangar's view of this host's NVIDIA GPUs (``make gpu-check``). Read-only.

Runs the inventory against sysfs and NVML, prints the ``hangar host inspect`` report,
then checks that every GPU is recognised by its PCI id and shows its NUMA node, driver,
UUID and MIG mode. An absent IOMMU group (usual inside a VM) is reported, not failed.

It changes nothing: sysfs is opened with a writer that refuses writes, NVML is only
queried, and the only commands run are ``modinfo -n vfio-pci`` and ``qemu-system-x86_64
--version``.

Exit status: 0 all checks pass, 1 some check failed (listed), 2 no NVIDIA GPU found,
3 no PCI devices readable under the sysfs root.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout

from rich.console import Console

from hangar.devices.inventory import Gpu, HostInventory, NvmlStatus, read_inventory
from hangar.devices.nvml import NoNvml, NvmlReader, PynvmlReader
from hangar.devices.pci import PCI_DEVICES, device_attr
from hangar.devices.report import render_inspect_report
from hangar.devices.sysfs import ReadOnlyWriter, SysfsRoot

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NO_GPU = 2
EXIT_NO_SYSFS = 3

_GIB = 1024**3
_MEMORY_TOLERANCE = 0.10


def check_gpu(sysfs: SysfsRoot, gpu: Gpu, nvml: NvmlStatus) -> tuple[list[str], list[str]]:
    """Failures and notes for one GPU."""
    failures: list[str] = []
    notes: list[str] = []
    if not gpu.kind.known:
        failures.append(f"PCI id {gpu.pci.pci_id} is not in hangar's GPU catalog")
    numa_text = sysfs.read_text(device_attr(gpu.bdf, "numa_node"))
    if numa_text is None:
        failures.append("numa_node is missing from sysfs")
    elif gpu.numa_node is None:
        notes.append(f"numa_node is {numa_text}: the kernel gives this GPU no NUMA affinity")
    if gpu.iommu_group is None:
        notes.append("no IOMMU group (expected inside a VM): VFIO passthrough impossible here")
    if gpu.driver is None:
        failures.append("no driver bound")
    if gpu.uuid is None:
        why = nvml.reason if not nvml.available else "; ".join(gpu.nvml_errors) or "not listed"
        failures.append(f"no UUID from NVML ({why})")
    if gpu.mig_mode == "unknown":
        failures.append("MIG mode unknown (NVML did not report it)")
    elif gpu.mig_mode == "unsupported" and gpu.kind.mig_capable:
        notes.append(f"NVML reports MIG unsupported, though {gpu.kind.name} supports MIG")
    if gpu.memory_total_bytes is not None and gpu.kind.memory_gb:
        seen = gpu.memory_total_bytes / _GIB
        if abs(seen - gpu.kind.memory_gb) > _MEMORY_TOLERANCE * gpu.kind.memory_gb:
            notes.append(
                f"NVML memory {seen:.1f} GiB is far from the catalog's {gpu.kind.memory_gb} GB"
            )
    failures.extend(f"NVML: {error}" for error in gpu.nvml_errors)
    return failures, notes


def run_checks(inventory: HostInventory, sysfs: SysfsRoot, console: Console) -> int:
    failures_total = 0
    console.print("\n[bold]gpu-check[/bold]")
    for gpu in inventory.gpus:
        failures, notes = check_gpu(sysfs, gpu, inventory.nvml_status)
        failures_total += len(failures)
        verdict = "[red]FAIL[/red]" if failures else "[green]ok[/green]"
        console.print(f"{verdict} {gpu.bdf} {gpu.kind.name} ({gpu.pci.pci_id})")
        for failure in failures:
            console.print(f"    [red]failure:[/red] {failure}")
        for note in notes:
            console.print(f"    [yellow]note:[/yellow] {note}")
    for switch in inventory.nvswitches:
        console.print(f"ok {switch.bdf} {switch.name}: NVSwitch, not offered as a GPU")
    if failures_total:
        console.print(f"[red]{failures_total} check(s) failed[/red]")
        return EXIT_FAILED
    console.print(f"[green]all checks passed for {len(inventory.gpus)} GPU(s)[/green]")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sysfs-root", type=Path, default=Path("/sys"))
    parser.add_argument("--no-nvml", action="store_true", help="do not load NVML")
    parser.add_argument("--json", type=Path, help="also write the inventory as JSON here")
    args = parser.parse_args(argv)

    console = Console(width=None if sys.stdout.isatty() else 200)
    sysfs = SysfsRoot(args.sysfs_root, writer=ReadOnlyWriter())
    if not sysfs.list_dir(PCI_DEVICES):
        console.print(f"[red]no PCI devices readable under {args.sysfs_root}/{PCI_DEVICES}[/red]")
        return EXIT_NO_SYSFS
    nvml: NvmlReader = NoNvml("disabled by --no-nvml") if args.no_nvml else PynvmlReader()
    inventory = read_inventory(sysfs, nvml=nvml)
    if args.json:
        args.json.write_text(inventory.model_dump_json(indent=2))
    console.print(render_inspect_report(inventory))
    if not inventory.gpus:
        console.print("[bold yellow]gpu-check: no NVIDIA GPU found on this host[/bold yellow]")
        return EXIT_NO_GPU
    return run_checks(inventory, sysfs, console)


if __name__ == "__main__":
    sys.exit(main())
