"""Cross-checks of hangar's view of a GPU against the tools operators trust, read-only.

``make gpu-check`` runs these on a real host: BAR sizes, link speed and width, NUMA node
and driver as hangar parses them from sysfs, against ``lspci -vvv``; MIG and ECC modes
(current and pending), remapped rows and module id as hangar reads them through NVML,
against ``nvidia-smi -q``; the device nodes the guest's ``hangar-nvidia-nodes`` would
create, against the real ``/dev/nvidia*``; the firmware ``modinfo -F firmware nvidia``
names, against what the driver bundle ships. Nothing here writes anything.

Each check returns ``(failures, notes)``: a failure is a disagreement (hangar misreads
the host), a note is worth knowing (a link running slower than it can, say).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel

from hangar.devices.health import read_link
from hangar.devices.inventory import Gpu
from hangar.devices.pci import normalize_bdf
from hangar.devices.sysfs import SysfsRoot

Findings = tuple[list[str], list[str]]

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_HEADER = re.compile(r"^(?P<bdf>(?:[0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]) ")
_REGION = re.compile(
    r"^\s*Region (?P<index>\d+): Memory at \S+(?: \((?P<kind>[^)]*)\))?.*\[size=(?P<size>\d+)"
    r"(?P<unit>[KMGT]?)\]"
)
_LNKCAP = re.compile(r"LnkCap:\s+Port #\d+, Speed (?P<speed>[\d.]+)GT/s, Width x(?P<width>\d+)")
_LNKSTA = re.compile(r"LnkSta:\s+Speed (?P<speed>[\d.]+)GT/s[^,]*, Width x(?P<width>\d+)")
_SMI_LINE = re.compile(r"^(?P<indent> *)(?P<key>[^:]+?)\s*(?::\s*(?P<value>.*))?$")


class LspciDevice(BaseModel):
    bdf: str
    bar_sizes: dict[int, int] = {}
    """Memory regions by index, in bytes."""
    bar64: dict[int, bool] = {}
    link_speed_gts: float | None = None
    link_width: int | None = None
    max_link_speed_gts: float | None = None
    max_link_width: int | None = None
    numa_node: int | None = None
    driver: str | None = None
    aer: bool = False
    """Whether it shows an Advanced Error Reporting capability."""


def parse_lspci(text: str) -> dict[str, LspciDevice]:
    """``lspci -D -vvv`` (or without ``-D``: domain 0000) by device."""
    devices: dict[str, LspciDevice] = {}
    current: LspciDevice | None = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = LspciDevice(bdf=normalize_bdf(header["bdf"]))
            devices[current.bdf] = current
            continue
        if current is None:
            continue
        if region := _REGION.match(line):
            index = int(region["index"])
            current.bar_sizes[index] = int(region["size"]) * _UNITS[region["unit"]]
            current.bar64[index] = "64-bit" in (region["kind"] or "")
        elif cap := _LNKCAP.search(line):
            current.max_link_speed_gts = float(cap["speed"])
            current.max_link_width = int(cap["width"])
        elif sta := _LNKSTA.search(line):
            current.link_speed_gts = float(sta["speed"])
            current.link_width = int(sta["width"])
        elif line.strip().startswith("NUMA node:"):
            current.numa_node = int(line.split(":", 1)[1])
        elif line.strip().startswith("Kernel driver in use:"):
            current.driver = line.split(":", 1)[1].strip()
        elif "Advanced Error Reporting" in line:
            current.aer = True
    return devices


class SmiGpu(BaseModel):
    """What ``nvidia-smi -q`` says about one GPU, by the section path of each value."""

    bdf: str
    values: dict[str, str]
    """``"MIG Mode/Current": "Disabled"``: section names joined by ``/``."""

    def get(self, *path: str) -> str | None:
        """The value whose section path ends with ``path``."""
        suffix = "/".join(path)
        for key, value in self.values.items():
            if key == suffix or key.endswith("/" + suffix):
                return value
        return None


def parse_nvidia_smi_q(text: str) -> dict[str, SmiGpu]:
    """``nvidia-smi -q``: indented ``Key : Value`` lines under ``GPU <bus id>`` sections."""
    gpus: dict[str, SmiGpu] = {}
    stack: list[tuple[int, str]] = []
    current: SmiGpu | None = None
    for line in text.splitlines():
        if not line.strip() or line.startswith("="):
            continue
        if line.startswith("GPU "):  # a GPU section: "GPU 00000000:18:00.0"
            current = SmiGpu(bdf=normalize_bdf(line[4:].strip()), values={})
            gpus[current.bdf] = current
            stack = []
            continue
        match = _SMI_LINE.match(line)
        if match is None:
            continue
        indent, key, value = len(match["indent"]), match["key"].strip(), match["value"]
        if current is None:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if value is None or value == "":
            stack.append((indent, key))
        else:
            current.values["/".join([*(name for _, name in stack), key])] = value.strip()
    return gpus


def _mode(value: str | None) -> str | None:
    return None if value is None else value.strip().lower()


def check_against_lspci(sysfs: SysfsRoot, gpu: Gpu, lspci: LspciDevice | None) -> Findings:
    failures: list[str] = []
    notes: list[str] = []
    if lspci is None:
        return [], ["lspci does not list it (pciutils missing?)"]
    for bar in gpu.pci.bars:
        if bar.is_rom or bar.is_io:
            continue
        shown = lspci.bar_sizes.get(bar.index)
        if shown != bar.size:
            failures.append(f"BAR{bar.index}: hangar reads {bar.size} bytes, lspci shows {shown}")
    link = read_link(sysfs, gpu.bdf)
    if lspci.max_link_width is not None and link.max_width != lspci.max_link_width:
        failures.append(f"max link width: hangar x{link.max_width}, lspci x{lspci.max_link_width}")
    if lspci.max_link_speed_gts is not None and link.max_speed_gts != lspci.max_link_speed_gts:
        failures.append(
            f"max link speed: hangar {link.max_speed_gts} GT/s, lspci {lspci.max_link_speed_gts}"
        )
    if lspci.link_width is not None and link.width != lspci.link_width:
        failures.append(f"link width: hangar x{link.width}, lspci x{lspci.link_width}")
    if lspci.link_speed_gts is not None and link.speed_gts != lspci.link_speed_gts:
        notes.append(
            f"link speed: hangar {link.speed_gts} GT/s, lspci {lspci.link_speed_gts} GT/s "
            "(an idle GPU changes its speed between reads)"
        )
    if gpu.numa_node != lspci.numa_node:
        failures.append(f"NUMA node: hangar {gpu.numa_node}, lspci {lspci.numa_node}")
    if gpu.driver != lspci.driver:
        failures.append(f"driver: hangar {gpu.driver}, lspci {lspci.driver}")
    return failures, notes


def check_against_nvidia_smi(gpu: Gpu, smi: SmiGpu | None) -> Findings:
    """NVML as hangar reads it, against nvidia-smi -q (both from the same driver)."""
    if smi is None:
        return [], ["nvidia-smi -q does not list it"]
    nvml = gpu.nvml
    if nvml is None:
        return ["NVML does not report it, though nvidia-smi does"], []
    failures: list[str] = []
    pairs = [
        ("MIG mode", nvml.mig_mode, smi.get("MIG Mode", "Current")),
        (
            "pending MIG mode",
            nvml.mig_mode_pending or nvml.mig_mode,
            smi.get("MIG Mode", "Pending"),
        ),
        ("ECC mode", nvml.ecc_mode, smi.get("ECC Mode", "Current")),
        ("pending ECC mode", nvml.ecc_mode_pending, smi.get("ECC Mode", "Pending")),
    ]
    for what, hangar, shown in pairs:
        if shown is None or _mode(shown) == "n/a":
            continue
        if hangar != _mode(shown):
            failures.append(f"{what}: hangar {hangar}, nvidia-smi {shown}")
    module = smi.get("Module ID") or smi.get("Module Id")
    if module is not None and module.isdigit() and nvml.module_id != int(module):
        failures.append(f"module id: hangar {nvml.module_id}, nvidia-smi {module}")
    rows = nvml.remapped_rows
    pending = smi.get("Remapped Rows", "Pending")
    if rows is not None and pending is not None and (pending.lower() == "yes") != rows.pending:
        failures.append(f"remap pending: hangar {rows.pending}, nvidia-smi {pending}")
    failure = smi.get("Remapped Rows", "Remapping Failure Occurred")
    if rows is not None and failure is not None and (failure.lower() == "yes") != rows.failure:
        failures.append(f"remap failure: hangar {rows.failure}, nvidia-smi {failure}")
    fabric = smi.get("Fabric", "State")
    notes = [f"fabric state: hangar {nvml.fabric_state}, nvidia-smi {fabric}"] if fabric else []
    return failures, notes


def check_device_nodes(expected: Iterable[str], dev: Path) -> Findings:
    """``NAME MAJOR MINOR`` lines from hangar-nvidia-nodes, against ``dev``."""
    failures: list[str] = []
    notes: list[str] = []
    wanted = {}
    for line in expected:
        fields = line.split()
        if len(fields) == 3:
            wanted[fields[0]] = (int(fields[1]), int(fields[2]))
    for name, (major, minor) in sorted(wanted.items()):
        try:
            info = os.stat(dev / name)
        except OSError:
            failures.append(f"/dev/{name} ({major}:{minor}) does not exist on this host")
            continue
        if not stat.S_ISCHR(info.st_mode):
            failures.append(f"/dev/{name} is not a character device")
        elif (os.major(info.st_rdev), os.minor(info.st_rdev)) != (major, minor):
            failures.append(
                f"/dev/{name} is {os.major(info.st_rdev)}:{os.minor(info.st_rdev)}, "
                f"hangar would make {major}:{minor}"
            )
    real = sorted(path.name for path in dev.glob("nvidia*") if not path.is_dir())
    extra = [name for name in real if name not in wanted]
    if extra:
        notes.append("on this host but not made in guests: " + ", ".join(extra))
    if not wanted:
        failures.append("hangar-nvidia-nodes lists no node (is the nvidia driver loaded?)")
    return failures, notes


def check_firmware(
    module_firmware: list[str], driver_version: str | None, bundle_firmware: Path | None
) -> Findings:
    """The firmware the host's nvidia module names against the bundle's firmware folder."""
    if not module_firmware:
        return [], ["modinfo names no firmware for nvidia (no module, or a pre-GSP driver)"]
    if bundle_firmware is None:
        return [], [
            "no driver bundle configured (HANGAR_GPU_DRIVER_BUNDLE): the host's nvidia "
            "module names " + ", ".join(module_firmware)
        ]
    versions = {name.split("/")[1] for name in module_firmware if name.count("/") >= 2}
    if driver_version is not None and driver_version not in versions:
        return [], [
            f"the host's driver ({', '.join(sorted(versions))}) is not the bundle's "
            f"({driver_version}): firmware not compared"
        ]
    missing = [name for name in module_firmware if not (bundle_firmware / name).is_file()]
    if missing:
        return [f"the bundle lacks firmware the driver loads: {', '.join(missing)}"], []
    return [], [f"the bundle ships all {len(module_firmware)} firmware files the driver names"]
