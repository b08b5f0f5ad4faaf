"""Health before reuse: link, AER, config space from sysfs; memory and recovery state from
NVML; Xid lines the guest forwarded."""

from __future__ import annotations

import pytest

from hangar.devices.health import AerCounts, health_check, nvml_findings, read_aer
from hangar.devices.nvml import NvmlGpu, PynvmlReader, RemappedRows
from hangar.devices.sysfs import SysfsRoot
from hangar.devices.xid import guest_addresses, parse_xid, xid_events
from hangar.errors import DeviceError
from tests.devices.fake_pynvml import FakePynvml, hgx_nvml_gpus
from tests.devices.sysfs_fixture import GEN1, GEN5, HGX_H100_GPUS, SysfsBuilder

GPU = next(iter(HGX_H100_GPUS))


def test_a_healthy_gpu_has_no_findings(hgx: SysfsBuilder) -> None:
    report = health_check(SysfsRoot(hgx.root), GPU, require_max_link_speed=True)

    assert report.ok and report.findings == []
    assert report.aer == AerCounts(correctable=0, nonfatal=0, fatal=0)
    assert report.link is not None and (report.link.width, report.link.speed_gts) == (16, 32.0)


def test_a_degraded_link_width_fails(hgx: SysfsBuilder) -> None:
    hgx.set_link(hgx.device_dir(GPU), (GEN5, 8), (GEN5, 16))

    report = health_check(SysfsRoot(hgx.root), GPU)

    assert [(f.check, f.severity, f.detail) for f in report.findings] == [
        ("link-width", "fail", "x8, capable of x16: a degraded link")
    ]
    with pytest.raises(DeviceError) as raised:
        report.raise_if_failed()
    assert raised.value.fields["reason"] == "unhealthy"


def test_a_slow_link_fails_only_where_full_speed_is_required(hgx: SysfsBuilder) -> None:
    """Under the nvidia driver an idle GPU drops to 2.5 GT/s on purpose; right after a reset
    on vfio-pci it must train at its maximum."""
    hgx.set_link(hgx.device_dir(GPU), (GEN1, 16), (GEN5, 16))
    sysfs = SysfsRoot(hgx.root)

    idle = health_check(sysfs, GPU)
    after_reset = health_check(sysfs, GPU, require_max_link_speed=True)

    assert idle.ok and [f.severity for f in idle.findings] == ["note"]
    assert [(f.check, f.severity) for f in after_reset.findings] == [("link-speed", "fail")]


def test_new_uncorrectable_aer_errors_fail_and_old_ones_do_not(hgx: SysfsBuilder) -> None:
    sysfs = SysfsRoot(hgx.root)
    hgx.set_aer(GPU, "aer_dev_nonfatal", CmpltTO=2)
    baseline = read_aer(sysfs, GPU)
    assert baseline == AerCounts(correctable=0, nonfatal=2, fatal=0)

    unchanged = health_check(sysfs, GPU, baseline=baseline)
    hgx.set_aer(GPU, "aer_dev_fatal", MalfTLP=1)
    hgx.set_aer(GPU, "aer_dev_correctable", BadDLLP=3)
    worse = health_check(sysfs, GPU, baseline=baseline)

    assert unchanged.ok
    assert [(f.check, f.severity, f.detail) for f in worse.findings] == [
        ("aer-fatal", "fail", "1 uncorrectable (fatal) PCIe error(s) since the claim"),
        ("aer-correctable", "note", "3 correctable"),
    ]


def test_a_flood_of_correctable_errors_fails(hgx: SysfsBuilder) -> None:
    hgx.set_aer(GPU, "aer_dev_correctable", RxErr=500)

    report = health_check(SysfsRoot(hgx.root), GPU)

    assert [(f.check, f.severity) for f in report.findings] == [("aer-correctable", "fail")]


def test_config_space_that_reads_ones_fails(hgx: SysfsBuilder) -> None:
    config = hgx.device_dir(GPU) / "config"
    config.write_bytes(b"\xff" * 256)

    report = health_check(SysfsRoot(hgx.root), GPU)

    assert [(f.check, f.detail) for f in report.failures] == [
        ("config-space", "reads ffff:ffff, expected 10de:2330")
    ]


def _nvml_gpu(**changes: object) -> NvmlGpu:
    fake = FakePynvml(hgx_nvml_gpus()[:1])
    for name, value in changes.items():
        setattr(fake.gpus[0], name, value)
    [gpu] = PynvmlReader(load=lambda: fake).read().gpus
    return gpu


def test_nvml_reads_memory_health_and_recovery_state() -> None:
    gpu = _nvml_gpu(
        remapped_rows=(3, 1, 1, 0),
        retired_pages_pending=1,
        uncorrectable_ecc=2,
        recovery_action=1,
        module_id=5,
        fabric_state=2,
    )

    assert gpu.remapped_rows == RemappedRows(
        correctable=3, uncorrectable=1, pending=True, failure=False
    )
    assert (gpu.module_id, gpu.fabric_state, gpu.recovery_action) == (5, "in-progress", "gpu-reset")
    assert [(f.check, f.severity) for f in nvml_findings(gpu)] == [
        ("row-remap", "fail"),
        ("retired-pages", "fail"),
        ("ecc", "fail"),
        ("recovery-action", "fail"),
        ("fabric", "note"),
    ]


def test_a_clean_nvml_report_has_no_findings() -> None:
    gpu = _nvml_gpu()

    assert nvml_findings(gpu) == []
    assert (gpu.ecc_mode, gpu.ecc_mode_pending) == ("enabled", "enabled")


def test_a_failed_row_remap_fails() -> None:
    findings = nvml_findings(_nvml_gpu(remapped_rows=(0, 4, 0, 1)))

    assert [(f.check, f.detail) for f in findings] == [("row-remap", "row remapping failed")]


GUEST_LINE = (
    "4,812,93810412,-;NVRM: Xid (PCI:0000:01:00): 79, pid=1234, name=python, "
    "GPU has fallen off the bus."
)


def test_xid_lines_map_to_the_host_gpu_through_query_pci() -> None:
    query_pci = [
        {
            "bus": 0,
            "devices": [
                {"bus": 0, "slot": 1, "function": 0, "qdev_id": "pxb0"},
                {
                    "bus": 0,
                    "slot": 2,
                    "function": 0,
                    "qdev_id": "rp0",
                    "pci_bridge": {
                        "bus": {"number": 0, "secondary": 1, "subordinate": 1},
                        "devices": [{"bus": 1, "slot": 0, "function": 0, "qdev_id": "gpu0"}],
                    },
                },
            ],
        }
    ]
    address_map = guest_addresses(query_pci, {"gpu0": GPU})

    events = xid_events(
        [{"type": "ready"}, {"type": "xid", "line": GUEST_LINE}, {"type": "xid", "line": "noise"}],
        address_map,
    )

    assert address_map == {"0000:01:00.0": GPU}
    [event] = events
    assert (event.host_bdf, event.code, event.needs_quarantine) == (GPU, 79, True)


def test_xid_findings_quarantine_only_on_damaging_codes(hgx: SysfsBuilder) -> None:
    harmless = parse_xid(
        "NVRM: Xid (PCI:0000:01:00): 13, Graphics Exception", {"0000:01:00.0": GPU}
    )
    damaging = parse_xid("NVRM: Xid (PCI:0000:01:00): 48, DBE (double bit error)", {})

    assert harmless is not None and damaging is not None
    report = health_check(SysfsRoot(hgx.root), GPU, xids=[harmless, damaging])

    assert [(f.check, f.severity) for f in report.findings] == [
        ("xid-13", "note"),
        ("xid-48", "fail"),
    ]


def test_a_guest_cannot_flood_the_host_with_xids() -> None:
    line = {"type": "xid", "line": "NVRM: Xid (PCI:0000:01:00): 13, x"}

    assert len(xid_events([line] * 10_000, {})) == 100
