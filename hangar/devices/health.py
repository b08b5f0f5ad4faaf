"""Is a GPU fit for the next tenant? Checks before reuse, as structured findings.

Vendor and device id in config space is not enough. From sysfs (any driver): the function
is present and answers with its ids; its PCIe link runs at its maximum width, and at its
maximum speed where that is required (right after a reset on vfio-pci: under the nvidia
driver an idle GPU lowers its link speed on purpose); its AER counters show no new
uncorrectable error (fatal or not) and no flood of correctable ones since the baseline
taken at claim. From NVML (the GPU on the nvidia driver): no row remapping pending or
failed, no page retirement pending, no uncorrectable ECC error, no recovery action asked
for (the driver's "reset required"), the NVLink fabric not stuck. Xid events the guest
forwarded (:mod:`hangar.devices.xid`) count too.

A finding with ``severity="fail"`` quarantines the GPU.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

from hangar.devices.nvml import NvmlGpu
from hangar.devices.pci import PCI_DEVICES, device_attr, read_pci_device
from hangar.devices.sysfs import SysfsRoot
from hangar.devices.xid import XidEvent
from hangar.errors import DeviceError

Severity = Literal["fail", "note"]

CONFIG_ID_BYTES = 4
CORRECTABLE_LIMIT = 100
"""Correctable AER errors one tenancy may add before the link counts as failing."""

_SPEED = re.compile(r"^([0-9.]+) GT/s")


class Finding(BaseModel):
    model_config = ConfigDict(frozen=True)

    check: str
    severity: Severity
    detail: str


class AerCounts(BaseModel):
    model_config = ConfigDict(frozen=True)

    correctable: int
    nonfatal: int
    fatal: int


class LinkState(BaseModel):
    model_config = ConfigDict(frozen=True)

    speed_gts: float | None
    max_speed_gts: float | None
    width: int | None
    max_width: int | None


class HealthReport(BaseModel):
    bdf: str
    findings: list[Finding]
    aer: AerCounts | None = None
    link: LinkState | None = None

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "fail"]

    def raise_if_failed(self) -> None:
        if self.failures:
            raise DeviceError(
                f"GPU {self.bdf} failed its health check: "
                + "; ".join(f"{f.check}: {f.detail}" for f in self.failures),
                bdf=self.bdf,
                reason="unhealthy",
                findings=[f.model_dump() for f in self.failures],
                retry=False,
            )


def read_aer(sysfs: SysfsRoot, bdf: str) -> AerCounts | None:
    """The function's AER totals since boot; None where the kernel shows no AER counters."""
    totals = []
    for name, total in (
        ("aer_dev_correctable", "TOTAL_ERR_COR"),
        ("aer_dev_nonfatal", "TOTAL_ERR_NONFATAL"),
        ("aer_dev_fatal", "TOTAL_ERR_FATAL"),
    ):
        text = sysfs.read_text(device_attr(bdf, name))
        if text is None:
            return None
        counts = dict(line.split(None, 1) for line in text.splitlines() if line.strip())
        totals.append(int(counts.get(total, "0").strip()))
    return AerCounts(correctable=totals[0], nonfatal=totals[1], fatal=totals[2])


def read_link(sysfs: SysfsRoot, bdf: str) -> LinkState:
    def speed(name: str) -> float | None:
        match = _SPEED.match(sysfs.read_text(device_attr(bdf, name)) or "")
        return float(match.group(1)) if match else None

    def width(name: str) -> int | None:
        text = sysfs.read_text(device_attr(bdf, name)) or ""
        return int(text) if text.isdigit() else None

    return LinkState(
        speed_gts=speed("current_link_speed"),
        max_speed_gts=speed("max_link_speed"),
        width=width("current_link_width"),
        max_width=width("max_link_width"),
    )


def sysfs_health(
    sysfs: SysfsRoot,
    bdf: str,
    *,
    baseline: AerCounts | None = None,
    require_max_link_speed: bool = False,
) -> HealthReport:
    """What sysfs shows about the function, under any driver. Reads only."""
    findings: list[Finding] = []
    if not sysfs.exists(f"{PCI_DEVICES}/{bdf}"):
        return HealthReport(
            bdf=bdf,
            findings=[Finding(check="present", severity="fail", detail="gone from the bus")],
        )
    device = read_pci_device(sysfs, bdf)
    config = sysfs.read_bytes(device_attr(bdf, "config"), CONFIG_ID_BYTES) or b""
    ids = (int.from_bytes(config[0:2], "little"), int.from_bytes(config[2:4], "little"))
    if len(config) < CONFIG_ID_BYTES or ids != (device.vendor_id, device.device_id):
        shown = f"{ids[0]:04x}:{ids[1]:04x}" if len(config) >= CONFIG_ID_BYTES else "nothing"
        findings.append(
            Finding(
                check="config-space",
                severity="fail",
                detail=f"reads {shown}, expected {device.pci_id}",
            )
        )
    link = read_link(sysfs, bdf)
    findings.extend(_link_findings(link, require_max_link_speed))
    aer = read_aer(sysfs, bdf)
    findings.extend(_aer_findings(aer, baseline))
    return HealthReport(bdf=bdf, findings=findings, aer=aer, link=link)


def _link_findings(link: LinkState, require_max_speed: bool) -> list[Finding]:
    findings = []
    if link.width is not None and link.max_width is not None and link.width < link.max_width:
        findings.append(
            Finding(
                check="link-width",
                severity="fail",
                detail=f"x{link.width}, capable of x{link.max_width}: a degraded link",
            )
        )
    if (
        link.speed_gts is not None
        and link.max_speed_gts is not None
        and link.speed_gts < link.max_speed_gts
    ):
        findings.append(
            Finding(
                check="link-speed",
                severity="fail" if require_max_speed else "note",
                detail=f"{link.speed_gts:g} GT/s, capable of {link.max_speed_gts:g} GT/s"
                + ("" if require_max_speed else " (an idle GPU may lower its link speed)"),
            )
        )
    return findings


def _aer_findings(aer: AerCounts | None, baseline: AerCounts | None) -> list[Finding]:
    if aer is None:
        return [Finding(check="aer", severity="note", detail="no AER counters in sysfs")]
    base = baseline or AerCounts(correctable=0, nonfatal=0, fatal=0)
    findings = []
    for name, now, before in (
        ("fatal", aer.fatal, base.fatal),
        ("nonfatal", aer.nonfatal, base.nonfatal),
    ):
        if now > before:
            findings.append(
                Finding(
                    check=f"aer-{name}",
                    severity="fail",
                    detail=f"{now - before} uncorrectable ({name}) PCIe error(s)"
                    + (" since the claim" if baseline else " since boot"),
                )
            )
    added = aer.correctable - base.correctable
    if added > CORRECTABLE_LIMIT:
        findings.append(
            Finding(
                check="aer-correctable",
                severity="fail",
                detail=f"{added} correctable PCIe errors (more than {CORRECTABLE_LIMIT})",
            )
        )
    elif added > 0:
        findings.append(
            Finding(check="aer-correctable", severity="note", detail=f"{added} correctable")
        )
    return findings


def nvml_findings(gpu: NvmlGpu) -> list[Finding]:
    """What NVML says about the GPU's memory and state."""
    findings = [Finding(check="nvml", severity="fail", detail=error) for error in gpu.errors]
    rows = gpu.remapped_rows
    if rows is not None and rows.failure:
        findings.append(Finding(check="row-remap", severity="fail", detail="row remapping failed"))
    if rows is not None and rows.pending:
        findings.append(
            Finding(
                check="row-remap",
                severity="fail",
                detail="a row remapping is pending: the GPU needs a reset",
            )
        )
    if gpu.retired_pages_pending:
        findings.append(
            Finding(check="retired-pages", severity="fail", detail="page retirement pending")
        )
    if gpu.uncorrectable_ecc_volatile:
        findings.append(
            Finding(
                check="ecc",
                severity="fail",
                detail=f"{gpu.uncorrectable_ecc_volatile} uncorrectable ECC error(s)",
            )
        )
    if gpu.recovery_action not in (None, "none"):
        findings.append(
            Finding(
                check="recovery-action",
                severity="fail",
                detail=f"the driver asks for {gpu.recovery_action}",
            )
        )
    if gpu.fabric_state == "in-progress":
        findings.append(
            Finding(
                check="fabric",
                severity="note",
                detail="NVLink fabric registration in progress (Fabric Manager not done)",
            )
        )
    return findings


def xid_findings(events: Sequence[XidEvent]) -> list[Finding]:
    return [
        Finding(
            check=f"xid-{event.code}",
            severity="fail" if event.needs_quarantine else "note",
            detail=event.text,
        )
        for event in events
    ]


def health_check(
    sysfs: SysfsRoot,
    bdf: str,
    *,
    nvml: NvmlGpu | None = None,
    xids: Sequence[XidEvent] = (),
    baseline: AerCounts | None = None,
    require_max_link_speed: bool = False,
) -> HealthReport:
    """Every check that applies: sysfs always, NVML when its report is given, and the
    guest's forwarded Xid events."""
    report = sysfs_health(
        sysfs, bdf, baseline=baseline, require_max_link_speed=require_max_link_speed
    )
    extra = (nvml_findings(nvml) if nvml is not None else []) + xid_findings(xids)
    return report.model_copy(update={"findings": [*report.findings, *extra]})
