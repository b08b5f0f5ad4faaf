"""NVLink on HGX boards: one GPU gets NVLink off; more get a Fabric Manager partition chosen
by module id, activated before boot and deactivated at the handoff."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hangar.devices.fabric import (
    FabricManager,
    choose_partition,
    nvlink_disabled_for,
    parse_partitions,
    partition_bdfs,
)
from hangar.errors import DeviceError
from hangar.model.gpu_kinds import gpu_kind_named
from tests.devices.sysfs_fixture import HGX_H100_GPUS

# Module ids as an HGX H100 board numbers its slots; deliberately not PCI address order.
MODULES = dict(zip([1, 3, 2, 4, 7, 5, 8, 6], HGX_H100_GPUS, strict=True))


def _listing() -> dict[str, object]:
    def gpu(module: int) -> dict[str, object]:
        bus = MODULES[module].upper()
        return {
            "physicalId": module,
            "pciBusId": f"0000{bus}",
            "uuid": f"GPU-{module}",
            "numEnabledNvLinks": 18,
        }

    partitions = [
        ([1, 2, 3, 4, 5, 6, 7, 8], 0),
        ([1, 2, 3, 4], 1),
        ([5, 6, 7, 8], 2),
        ([1, 2], 3),
        ([3, 4], 4),
        ([5, 6], 5),
        ([7, 8], 6),
    ]
    partitions += [([module], 6 + module) for module in range(1, 9)]
    return {
        "maxNumPartitions": 31,
        "numPartitions": len(partitions),
        "partitionInfo": [
            {
                "partitionId": pid,
                "isActive": 0,
                "numGpus": len(modules),
                "gpuInfo": [gpu(m) for m in modules],
            }
            for modules, pid in partitions
        ],
    }


def test_one_gpu_of_a_baseboard_kind_boots_with_nvlink_off() -> None:
    h100 = gpu_kind_named("h100-sxm")
    l40s = gpu_kind_named("l40s")
    assert h100 is not None and l40s is not None

    assert nvlink_disabled_for(h100, 1)
    assert not nvlink_disabled_for(h100, 4)
    assert not nvlink_disabled_for(l40s, 1)


def test_partitions_are_chosen_by_module_id_not_pci_order() -> None:
    partitions = parse_partitions(json.dumps(_listing()))
    free = set(MODULES) - {1}  # module 1 (PCI 18:00.0) is taken

    four = choose_partition(partitions, free, 4)
    two = choose_partition(partitions, free, 2)

    assert four is not None and four.partition_id == 2 and four.module_ids == [5, 6, 7, 8]
    assert partition_bdfs(four, MODULES) == [MODULES[m] for m in (5, 6, 7, 8)]
    assert partition_bdfs(four, MODULES) != sorted(HGX_H100_GPUS)[4:], "not address order"
    assert two is not None and two.module_ids == [3, 4]
    assert choose_partition(partitions, free, 8) is None


def test_a_partition_naming_an_unknown_module_is_an_error() -> None:
    [partition] = [p for p in parse_partitions(json.dumps(_listing())) if p.partition_id == 7]

    with pytest.raises(DeviceError, match="module ids \\[1\\]"):
        partition_bdfs(partition, {2: "0000:2a:00.0"})


def test_an_unreadable_listing_is_an_error() -> None:
    with pytest.raises(DeviceError) as raised:
        parse_partitions("Fabric Manager is not running")

    assert raised.value.fields["reason"] == "fabric_unreadable"


def write_fmpm(folder: Path) -> list[str]:
    """A stand-in for Fabric Manager's ``fmpm`` keeping the HGX board's partitions in a file
    in ``folder``; returns its command line."""
    state = folder / "partitions.json"
    state.write_text(json.dumps(_listing()))
    script = folder / "fmpm.py"
    script.write_text(
        "import json, sys\n"
        f"path = {str(state)!r}\n"
        "listing = json.load(open(path))\n"
        "if sys.argv[1] == '-l':\n"
        "    print(json.dumps(listing))\n"
        "    sys.exit(0)\n"
        "pid = int(sys.argv[2])\n"
        "for entry in listing['partitionInfo']:\n"
        "    if entry['partitionId'] == pid:\n"
        "        entry['isActive'] = int(sys.argv[1] == '-a')\n"
        "json.dump(listing, open(path, 'w'))\n"
    )
    return [sys.executable, str(script)]


@pytest.fixture
def fmpm(tmp_path: Path) -> list[str]:
    return write_fmpm(tmp_path)


def test_activate_before_boot_and_deactivate_at_handoff(fmpm: list[str]) -> None:
    manager = FabricManager(fmpm)

    manager.activate(2)
    manager.activate(2)  # idempotent, for a resumed durable step
    active = [p.partition_id for p in manager.partitions() if p.active]
    manager.deactivate(2)
    manager.deactivate(2)

    assert active == [2]
    assert not any(p.active for p in manager.partitions())


def test_an_active_partition_is_not_offered(fmpm: list[str]) -> None:
    manager = FabricManager(fmpm)
    manager.activate(2)

    chosen = choose_partition(manager.partitions(), set(MODULES), 4)

    assert chosen is not None and chosen.partition_id == 1


def test_a_failing_tool_is_a_device_error(tmp_path: Path) -> None:
    manager = FabricManager([sys.executable, "-c", "import sys; sys.exit('fmpm: not running')"])

    with pytest.raises(DeviceError) as raised:
        manager.partitions()

    assert raised.value.fields["reason"] == "fabric_failed"
