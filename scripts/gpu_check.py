#!/usr/bin/env python3
"""Check hangar's view of this host's NVIDIA GPUs (``make gpu-check``). Read-only.

Runs the inventory against sysfs and NVML, prints the ``hangar host inspect`` report,
then checks each GPU: recognised by its PCI id, with its NUMA node, driver, UUID and MIG
mode; its BAR sizes, link speed and width, NUMA node and driver as hangar parses them
against ``lspci -vvv``; MIG and ECC modes (current and pending), remapped rows and module
id as hangar reads NVML against ``nvidia-smi -q``; its reset methods and AER counters and
the health hangar would judge it by (shown as notes). For the host: the device nodes the
guest's ``hangar-nvidia-nodes`` would create against the real ``/dev/nvidia*``, and the
firmware ``modinfo -F firmware nvidia`` names against what the driver bundle
(``$HANGAR_GPU_DRIVER_BUNDLE``) ships. An absent IOMMU group (usual inside a VM) is
reported, not failed. Then GPU time shares (``scripts/mps_check.py``): an MPS control
daemon, two sandbox machines with a 0.5 share each allocating up to their caps and
computing, one allocation past a cap refused in that machine only, MPS stopped
(``--no-mps`` leaves it out; skipped, and said so, where MPS or a sandbox runtime is
missing).

It changes nothing: sysfs is opened with a writer that refuses writes, NVML is only
queried, and the only commands run are read-only: ``modinfo``, ``qemu-system-x86_64
--version``, ``lspci -D -vvv``, ``nvidia-smi -q`` and the guest's node-listing script
reading ``/proc``. No reset, no MIG/ECC/persistence change, no unbinding, no tool that
forces power settings.

Exit status: 0 all checks pass, 1 some check failed (listed), 2 no NVIDIA GPU found,
3 no PCI devices readable under the sysfs root.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout

from rich.console import Console

from hangar.devices.crosscheck import (
    Findings,
    LspciDevice,
    SmiGpu,
    check_against_lspci,
    check_against_nvidia_smi,
    check_device_nodes,
    check_firmware,
    parse_lspci,
    parse_nvidia_smi_q,
)
from hangar.devices.groups import group_of
from hangar.devices.health import nvml_findings, sysfs_health
from hangar.devices.hostpaths import HostPaths
from hangar.devices.inventory import Gpu, HostInventory, NvmlStatus, read_inventory
from hangar.devices.nvml import NoNvml, NvmlReader, PynvmlReader
from hangar.devices.pci import PCI_DEVICES, device_attr
from hangar.devices.readiness import CommandRunner, SubprocessRunner
from hangar.devices.report import render_inspect_report
from hangar.devices.sysfs import ReadOnlyWriter, SysfsRoot
from hangar.errors import DeviceError
from hangar.images.driver_bundle import (
    DRIVER_BUNDLE_SETTING,
    DriverBundleError,
    load_bundle_manifest,
)
from hangar.images.initramfs import nvidia_nodes_script

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


@dataclass
class HostTools:
    """What the cross-checks read besides sysfs and NVML; all of it read-only."""

    lspci: dict[str, LspciDevice] = field(default_factory=dict)
    lspci_note: str | None = None
    smi: dict[str, SmiGpu] = field(default_factory=dict)
    smi_note: str | None = None
    nodes: list[str] | None = None
    """hangar-nvidia-nodes' output for this host's /proc; None: not run."""
    module_firmware: list[str] = field(default_factory=list)
    bundle_firmware: Path | None = None
    bundle_driver_version: str | None = None
    bundle_note: str | None = None
    dev: Path = Path("/dev")


def gather_tools(runner: CommandRunner, paths: HostPaths, environ: dict[str, str]) -> HostTools:
    tools = HostTools(dev=paths.dev or Path("/dev"))
    lspci = runner.run(["lspci", "-D", "-vvv", "-d", "10de:"])
    if lspci.returncode == 0:
        tools.lspci = parse_lspci(lspci.stdout)
    else:
        tools.lspci_note = f"lspci not run (exit {lspci.returncode}): {lspci.stderr.strip()}"
    smi = runner.run(["nvidia-smi", "-q"])
    if smi.returncode == 0:
        tools.smi = parse_nvidia_smi_q(smi.stdout)
    else:
        tools.smi_note = f"nvidia-smi -q not run (exit {smi.returncode})"
    proc = str(paths.proc or Path("/proc"))
    nodes = runner.run(["sh", "-c", nvidia_nodes_script().decode(), "hangar-nvidia-nodes", proc])
    if nodes.returncode == 0:
        tools.nodes = nodes.stdout.splitlines()
    firmware = runner.run(["modinfo", "-F", "firmware", "nvidia"])
    if firmware.returncode == 0:
        tools.module_firmware = [line for line in firmware.stdout.split() if line]
    bundle = environ.get(DRIVER_BUNDLE_SETTING)
    if bundle:
        try:
            manifest = load_bundle_manifest(Path(bundle))
        except DriverBundleError as error:
            tools.bundle_note = f"driver bundle {bundle}: {error.message}"
        else:
            tools.bundle_driver_version = manifest.driver_version
            if Path(bundle).is_dir():
                tools.bundle_firmware = Path(bundle) / manifest.firmware
            else:
                tools.bundle_note = f"driver bundle {bundle} is an image: firmware not compared"
    return tools


def cross_check_gpu(sysfs: SysfsRoot, gpu: Gpu, tools: HostTools) -> Findings:
    """Failures and notes from comparing hangar's reading with lspci and nvidia-smi."""
    failures, notes = check_against_lspci(sysfs, gpu, tools.lspci.get(gpu.bdf))
    if tools.lspci_note:
        notes = [tools.lspci_note]
    smi_failures, smi_notes = check_against_nvidia_smi(gpu, tools.smi.get(gpu.bdf))
    if tools.smi_note:
        smi_failures, smi_notes = [], [tools.smi_note]
    failures += smi_failures
    notes += smi_notes
    notes.append(f"reset_method: {' '.join(gpu.pci.reset_methods or []) or 'none'}")
    if gpu.iommu_group is not None:
        try:
            group = group_of(sysfs, gpu.bdf)
        except DeviceError as error:
            notes.append(f"group: {error.message}")
        else:
            verdict = "can be claimed" if group.usable else "; ".join(group.problems)
            notes.append(
                f"IOMMU group {group.iommu_group}: {', '.join(group.bdfs)}; {verdict}; "
                f"bus reset at {group.parent_port or 'no port'}"
                + (" (reset_subordinate)" if group.parent_port_can_reset_subordinate else "")
            )
    health = sysfs_health(sysfs, gpu.bdf)
    if health.aer is not None:
        notes.append(
            f"AER since boot: {health.aer.correctable} correctable, {health.aer.nonfatal} "
            f"nonfatal, {health.aer.fatal} fatal"
        )
    if health.link is not None:
        link = health.link
        notes.append(
            f"link: {link.speed_gts} GT/s x{link.width} of {link.max_speed_gts} GT/s "
            f"x{link.max_width}"
        )
    nvml = gpu.nvml
    if nvml is not None:
        rows = nvml.remapped_rows
        notes.append(
            f"NVML: ECC {nvml.ecc_mode} (pending {nvml.ecc_mode_pending}), MIG {nvml.mig_mode}"
            f" (pending {nvml.mig_mode_pending or nvml.mig_mode}), module id {nvml.module_id}, "
            f"fabric {nvml.fabric_state}, recovery action {nvml.recovery_action}, "
            "remapped rows "
            + (
                "n/a"
                if rows is None
                else f"{rows.correctable}/{rows.uncorrectable} pending={rows.pending}"
                f" failure={rows.failure}"
            )
        )
    notes += [f"health: {f.check}: {f.detail}" for f in health.findings]
    if nvml is not None:
        notes += [f"health: {f.check}: {f.detail}" for f in nvml_findings(nvml)]
    return failures, notes


def host_checks(tools: HostTools) -> Findings:
    failures: list[str] = []
    notes: list[str] = []
    if tools.nodes is None:
        notes.append("hangar-nvidia-nodes could not run here")
    else:
        node_failures, node_notes = check_device_nodes(tools.nodes, tools.dev)
        failures += node_failures
        notes += [f"nodes hangar would make: {' '.join(tools.nodes) or 'none'}", *node_notes]
    firmware_failures, firmware_notes = check_firmware(
        tools.module_firmware, tools.bundle_driver_version, tools.bundle_firmware
    )
    failures += firmware_failures
    notes += firmware_notes
    if tools.bundle_note:
        notes.append(tools.bundle_note)
    return failures, notes


def run_checks(
    inventory: HostInventory,
    sysfs: SysfsRoot,
    console: Console,
    tools: HostTools | None = None,
) -> int:
    failures_total = 0
    console.print("\n[bold]gpu-check[/bold]")
    for gpu in inventory.gpus:
        failures, notes = check_gpu(sysfs, gpu, inventory.nvml_status)
        if tools is not None:
            more_failures, more_notes = cross_check_gpu(sysfs, gpu, tools)
            failures += more_failures
            notes += more_notes
        failures_total += len(failures)
        _verdict(console, f"{gpu.bdf} {gpu.kind.name} ({gpu.pci.pci_id})", failures, notes)
    for switch in inventory.nvswitches:
        console.print(f"ok {switch.bdf} {switch.name}: NVSwitch, not offered as a GPU")
    if tools is not None:
        failures, notes = host_checks(tools)
        failures_total += len(failures)
        _verdict(console, "host: device nodes and firmware", failures, notes)
    if failures_total:
        console.print(f"[red]{failures_total} check(s) failed[/red]")
        return EXIT_FAILED
    console.print(f"[green]all checks passed for {len(inventory.gpus)} GPU(s)[/green]")
    return EXIT_OK


def _verdict(console: Console, what: str, failures: list[str], notes: list[str]) -> None:
    verdict = "[red]FAIL[/red]" if failures else "[green]ok[/green]"
    console.print(f"{verdict} {what}")
    for failure in failures:
        console.print(f"    [red]failure:[/red] {failure}")
    for note in notes:
        console.print(f"    [yellow]note:[/yellow] {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sysfs-root", type=Path, default=Path("/sys"))
    parser.add_argument("--no-nvml", action="store_true", help="do not load NVML")
    parser.add_argument("--json", type=Path, help="also write the inventory as JSON here")
    parser.add_argument(
        "--no-tools",
        action="store_true",
        help="skip the lspci, nvidia-smi, modinfo and device-node cross-checks",
    )
    parser.add_argument("--no-mps", action="store_true", help="skip the MPS share check")
    args = parser.parse_args(argv)

    console = Console(width=None if sys.stdout.isatty() else 200)
    sysfs = SysfsRoot(args.sysfs_root, writer=ReadOnlyWriter())
    if not sysfs.list_dir(PCI_DEVICES):
        console.print(f"[red]no PCI devices readable under {args.sysfs_root}/{PCI_DEVICES}[/red]")
        return EXIT_NO_SYSFS
    nvml: NvmlReader = NoNvml("disabled by --no-nvml") if args.no_nvml else PynvmlReader()
    paths = HostPaths.beside(sysfs)
    inventory = read_inventory(sysfs, nvml=nvml, paths=paths)
    if args.json:
        args.json.write_text(inventory.model_dump_json(indent=2))
    console.print(render_inspect_report(inventory))
    if not inventory.gpus:
        console.print("[bold yellow]gpu-check: no NVIDIA GPU found on this host[/bold yellow]")
        console.print("[yellow]skip[/yellow] MPS shares: no GPU here")
        return EXIT_NO_GPU
    tools = None
    if not args.no_tools:
        tools = gather_tools(SubprocessRunner(), paths, dict(os.environ))
    status = run_checks(inventory, sysfs, console, tools)
    if args.no_mps:
        return status
    from mps_check import run as run_mps_check  # beside this script

    if run_mps_check(inventory, console):
        return EXIT_FAILED
    return status


if __name__ == "__main__":
    sys.exit(main())
